"""The reference-checkpoint loaders: each registers itself where it is defined.

A loader is a function ``(config, state_dict) -> nn.Module`` decorated with
:func:`register_reference_layer` (one layer of a method family, under the family's name) or
:func:`register_reference_model` (a whole network, under the architecture's name).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from ..registry import Registry

__all__ = [
    "ARCHITECTURES",
    "LAYER_METHODS",
    "register_reference_layer",
    "register_reference_model",
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
