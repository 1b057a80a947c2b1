"""The network registry: every builder in :mod:`dynaconv.models` registers itself.

A builder is a function ``name(num_classes=..., **options) -> nn.Module`` decorated with
:func:`register_model`; the function's name is the network's name (the name a configuration's
``model.name`` uses). :func:`create_model`, :func:`get_model_builder` and :func:`list_models`
find builders by name and never import anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from torch import nn

from ..registry import Registry

__all__ = ["MODELS", "create_model", "get_model_builder", "list_models", "register_model"]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_REGISTRY: Registry[Callable[..., nn.Module]] = Registry("model")

#: Network name -> builder (read-only; every builder decorated with :func:`register_model`).
MODELS: Mapping[str, Callable[..., nn.Module]] = _REGISTRY.view


@overload
def register_model(name_or_builder: str) -> Callable[[Builder], Builder]: ...


@overload
def register_model(name_or_builder: Builder) -> Builder: ...


def register_model(name_or_builder: Any) -> Any:
    """Decorator registering a network builder, returned unchanged.

    ``@register_model`` registers it under its function name, ``@register_model("name")``
    under ``name``. ``ValueError`` when the name is already registered.
    """
    return _REGISTRY.register(name_or_builder)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; ``ValueError`` listing the registered names."""
    return _REGISTRY.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network ``name`` with the builder's keyword arguments."""
    return get_model_builder(name)(**kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """The registered network names, sorted; ``pattern`` keeps those matching a shell-style
    wildcard (``list_models("condensenet*")``)."""
    return _REGISTRY.names(pattern)
