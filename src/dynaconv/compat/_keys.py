"""The checks every reference loader runs: its configuration's arguments, then the keys of the
state dict before renaming it."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from ..spec import CONV_ARGUMENTS

__all__ = ["check_config", "check_state_keys", "conv_arguments"]


def conv_arguments(*, without: Collection[str] = ()) -> tuple[str, ...]:
    """``nn.Conv2d``'s argument names (:data:`dynaconv.spec.CONV_ARGUMENTS`) but ``without``:
    the part of a reference layer's arguments that it shares with ``nn.Conv2d``."""
    return tuple(name for name in CONV_ARGUMENTS.parameters if name not in without)


def check_config(config: Mapping[str, Any], known: Iterable[str], *, layout: str) -> None:
    """``ValueError`` naming ``layout`` and the arguments of ``config`` that are not ``known``."""
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"unknown {layout} argument(s): {unknown}")


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
