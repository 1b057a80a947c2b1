"""Reference layouts of the dgconv family (to be implemented by its issue)."""
