"""The training system (kept apart from the library: nothing in dynaconv's layers imports it)."""
