"""The training package's error types and how its messages quote values (a module of its own
so that every train module, the configuration's validators included, can use them without
importing each other)."""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["ConfigError", "NonFiniteLossError", "short_repr", "short_text"]


class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type, bad value)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def short_text(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters (what error messages quote of another
    error's message)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a short prefix (what error messages quote of a value)."""
    return _SHORT.repr(value)
