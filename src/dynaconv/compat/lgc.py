"""Reference layouts of the lgc family (to be implemented by its issue)."""
