"""The method families: each registers itself once, with a decorator on its layer class.

A family is a :class:`Family` record in :data:`FAMILIES`: its name (what
``dynaconv.convert(model, name)`` and a configuration's ``model.convert.method`` use) and its
layer class. It is written once, next to the layer::

    @register_family("doconv")
    class DOConv2d(DynaConv2d): ...

The decorator also sets the class's ``method`` attribute to the name. Whatever else the tools
need to know about a family, the layer class states itself (its example options, the weight of
its regulariser, whether it has a static kernel, its structure maps: see
:class:`dynaconv.layers.DynaConv2d`). Everything that names a method finds it here and never
imports anything: :data:`dynaconv.lifecycle.METHODS`, :data:`dynaconv.demo.DEMO_METHODS` and
:data:`dynaconv.demo.AUX_LOSS_WEIGHTS` are read-only, live views of the records. A family's
reference-checkpoint loader registers itself in :mod:`dynaconv.compat` under the same name
(``compat.LAYER_METHODS[name]``; compat imports the layers, so this module never imports
compat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from .registry import Registry
from .spec import check_number

__all__ = [
    "FAMILIES",
    "Family",
    "FamilyView",
    "get_family",
    "list_families",
    "register_family",
    "unregister_family",
]

C = TypeVar("C", bound=type)
V = TypeVar("V")


@dataclass(frozen=True)
class Family:
    """One method family (see the module docstring).

    Attributes:
        name: the method's name (``"doconv"``).
        layer: its layer class (a :class:`~dynaconv.layers.DynaConv2d`).
    """

    name: str
    layer: type

    def __post_init__(self) -> None:
        if not isinstance(self.layer, type):
            raise ValueError(f"layer must be a class, got {self.layer!r}")


_REGISTRY: Registry[Family] = Registry("method")

#: Method name -> :class:`Family`, in the order of registration (read-only, live).
FAMILIES: Mapping[str, Family] = _REGISTRY.view


def register_family(name: str) -> Callable[[C], C]:
    """Class decorator registering a layer class as the family ``name`` (see :class:`Family`);
    sets the class's ``method`` to ``name`` and returns the class unchanged otherwise.

    ``ValueError`` when ``name`` is already registered or a fact the class states is invalid.
    """

    def decorator(cls: C) -> C:
        own = cls.__dict__.get("method", name)
        if own != name:
            raise ValueError(f"{cls.__name__}.method is {own!r}, registered as {name!r}")
        weight = getattr(cls, "example_aux_loss_weight", 0.0)
        check_number(weight, f"{cls.__name__}.example_aux_loss_weight", lambda w: w >= 0, ">= 0")
        _REGISTRY.add(name, Family(name, cls))
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
