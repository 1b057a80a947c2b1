"""The method families: each registers itself once, with a decorator on its layer class.

A family is a :class:`Family` record in :data:`FAMILIES`: its name (what
``dynaconv.convert(model, name)`` and a configuration's ``model.convert.method`` use), its
layer class, and what the tools need to know about it (the demo's options and aux-loss weight,
the kind of structure plot). It is written once, next to the layer::

    @register_family("doconv", structure_plot="binary")
    class DOConv2d(DynaConv2d): ...

The decorator also sets the class's ``method`` attribute to the name. Everything that names a
method finds it here and never imports anything: :data:`dynaconv.lifecycle.METHODS`,
:data:`dynaconv.demo.DEMO_METHODS` and :data:`dynaconv.demo.AUX_LOSS_WEIGHTS` are read-only,
live views of the records. A family's reference-checkpoint loader registers itself in
:mod:`dynaconv.compat` under the same name (``compat.LAYER_METHODS[name]``; compat imports
the layers, so this module never imports compat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from .registry import Registry

__all__ = [
    "FAMILIES",
    "STRUCTURE_PLOT_KINDS",
    "Family",
    "FamilyView",
    "get_family",
    "list_families",
    "register_family",
    "unregister_family",
]

#: The kinds of per-family structure plot :mod:`dynaconv.train.plots` draws: ``"binary"`` (any
#: 0/1 mask of the layer as an image), ``"groups"`` (learned group connectivity),
#: ``"routing"`` (per-example expert routing), ``"channel_usage"`` (channels kept per head).
STRUCTURE_PLOT_KINDS = ("binary", "groups", "routing", "channel_usage")

C = TypeVar("C", bound=type)
V = TypeVar("V")


def _frozen(options: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(options))


@dataclass(frozen=True)
class Family:
    """One method family (see the module docstring).

    Attributes:
        name: the method's name (``"doconv"``).
        layer: its layer class (a :class:`~dynaconv.layers.DynaConv2d`).
        demo_options: the options ``python -m dynaconv demo`` (and the generic tests) convert
            with, read-only.
        aux_loss_weight: the demo's weight of :func:`dynaconv.aux_loss` in the training loss.
        structure_plot: one of :data:`STRUCTURE_PLOT_KINDS`.
    """

    name: str
    layer: type
    demo_options: Mapping[str, Any] = field(default_factory=dict)
    aux_loss_weight: float = 0.0
    structure_plot: str = "binary"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, type):
            raise ValueError(f"layer must be a class, got {self.layer!r}")
        if self.structure_plot not in STRUCTURE_PLOT_KINDS:
            raise ValueError(
                f"structure_plot must be one of {STRUCTURE_PLOT_KINDS}, got {self.structure_plot!r}"
            )
        weight = self.aux_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ValueError(f"aux_loss_weight must be a number >= 0, got {weight!r}")
        object.__setattr__(self, "demo_options", _frozen(self.demo_options))


_REGISTRY: Registry[Family] = Registry("method")

#: Method name -> :class:`Family`, in the order of registration (read-only, live).
FAMILIES: Mapping[str, Family] = _REGISTRY.view


def register_family(
    name: str,
    *,
    demo_options: Mapping[str, Any] | None = None,
    aux_loss_weight: float = 0.0,
    structure_plot: str = "binary",
) -> Callable[[C], C]:
    """Class decorator registering a layer class as the family ``name`` (see :class:`Family`);
    sets the class's ``method`` to ``name`` and returns the class unchanged otherwise.

    ``ValueError`` when ``name`` is already registered or a field is invalid.
    """

    def decorator(cls: C) -> C:
        own = cls.__dict__.get("method", name)
        if own != name:
            raise ValueError(f"{cls.__name__}.method is {own!r}, registered as {name!r}")
        family = Family(name, cls, dict(demo_options or {}), aux_loss_weight, structure_plot)
        _REGISTRY.add(name, family)
        cls.method = name  # type: ignore[attr-defined]
        return cls

    return decorator


def unregister_family(name: str) -> Family:
    """Remove the family ``name`` (plugins and tests that register one temporarily)."""
    return _REGISTRY.remove(name)


def get_family(name: str) -> Family:
    """The family ``name``; ``ValueError`` naming the registered methods otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY.get(name)


def list_families() -> list[str]:
    """The registered method names, sorted."""
    return _REGISTRY.names()


class FamilyView(Mapping[str, V], Generic[V]):
    """A read-only, live mapping method name -> one field of its :class:`Family`."""

    def __init__(self, field_of: Callable[[Family], V]) -> None:
        self._field_of = field_of

    def __getitem__(self, name: str) -> V:
        return self._field_of(FAMILIES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(FAMILIES))

    def __len__(self) -> int:
        return len(FAMILIES)

    def __repr__(self) -> str:
        return repr(dict(self))
