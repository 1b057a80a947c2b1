"""The key check every reference loader runs before renaming a state dict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_state_keys"]


def check_state_keys(
    state_dict: Mapping[str, Any],
    required: Iterable[str],
    optional: Iterable[str] = (),
    *,
    layout: str,
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` holds every ``required`` key and no other
    than those and the ``optional`` ones.

    The message names ``layout`` (e.g. ``"reference DOConv2d"``), the missing and the
    unexpected keys, and the keys that were expected, so a user sees at once which file or
    configuration does not fit.
    """
    required = set(required)
    allowed = required | set(optional)
    keys = set(state_dict)
    missing = sorted(required - keys)
    unexpected = sorted(keys - allowed)
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing}")
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected}")
    expected = f"expected the keys {sorted(required)}"
    if allowed != required:
        expected += f" and optionally {sorted(allowed - required)}"
    raise ValueError(f"{layout} state dict does not fit: {', '.join(problems)} ({expected})")
