"""The training package's error type (a module of its own so that every train module, the
configuration's validators included, can raise it without importing each other)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type, bad value)."""
