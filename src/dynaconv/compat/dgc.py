"""Reference layouts of the dgc family (to be implemented by its issue)."""
