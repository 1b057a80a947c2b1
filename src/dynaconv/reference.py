"""The ground floor of the papers' checkpoint loaders: their registries and their checks.

A loader is a function ``(config, state_dict) -> nn.Module`` decorated with
:func:`register_reference_layer` (one layer of a family, under the family's name: it lives in
the family's folder, ``dynaconv/layers/<family>/reference.py``) or
:func:`register_reference_model` (a whole network, under the architecture's name, in
:mod:`dynaconv.compat`); each registers itself where it is defined. Every loader checks its
configuration's arguments (:func:`check_config`, :func:`conv_arguments`) and the keys of the
state dict before renaming it (:func:`check_state_keys`, :func:`state_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .registry import Registry
from .spec import CONV_ARGUMENTS

__all__ = [
    "ARCHITECTURES",
    "BATCHNORM_KEYS",
    "LAYER_METHODS",
    "add_prefix",
    "check_config",
    "check_state_keys",
    "conv_arguments",
    "register_reference_layer",
    "register_reference_model",
    "state_dtype",
]

Loader = Callable[[dict[str, Any], dict[str, Any]], nn.Module]
L = TypeVar("L", bound=Callable[..., nn.Module])

_LAYERS: Registry[Loader] = Registry("reference layer loader")
_MODELS: Registry[Loader] = Registry("reference architecture loader")

#: Method -> loader of the paper's layer (read-only, live).
LAYER_METHODS: Mapping[str, Loader] = _LAYERS.view

#: Architecture -> loader of the paper's network (read-only, live).
ARCHITECTURES: Mapping[str, Loader] = _MODELS.view


def register_reference_layer(method: str) -> Callable[[L], L]:
    """Decorator registering the loader of ``method``'s reference layers."""
    return _LAYERS.register(method)


def register_reference_model(arch: str) -> Callable[[L], L]:
    """Decorator registering the loader of the reference network ``arch``."""
    return _MODELS.register(arch)


def unregister_reference_layer(method: str) -> Loader:
    """Remove ``method``'s loader (for families registered temporarily)."""
    return _LAYERS.remove(method)


def resolve(table: Mapping[str, Loader], name: str, what: str) -> Loader:
    if name not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ------------------------------------------------------------------------------------------
# the checks every loader runs

#: The state-dict entries of an ``nn.BatchNorm2d`` (``num_batches_tracked`` last: old
#: checkpoints may lack it).
BATCHNORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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


def state_dtype(state_dict: Mapping[str, Tensor], key: str) -> torch.dtype:
    """The dtype the loaded module gets: that of the reference tensor ``key`` (a conv kernel);
    ``ValueError`` when it is missing or not floating point."""
    if key not in state_dict:
        raise ValueError(f"missing key(s) in the reference state dict: ['{key}']")
    dtype = state_dict[key].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"reference tensor {key} must be floating point, got {dtype}")
    return dtype


def add_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``state`` with ``prefix`` before every key."""
    return {prefix + k: v for k, v in state.items()}
