"""Reference layouts of the condconv family (to be implemented by its issue)."""
