"""Name -> object registries: how dynaconv finds the things a name in a configuration refers to.

A :class:`Registry` maps names to objects (builder functions, classes, records). Objects
register themselves where they are defined, with a decorator::

    MODELS = Registry("model")

    @MODELS.register              # registered as "small_cnn" (the function's name)
    def small_cnn(num_classes: int = 10) -> nn.Module: ...

    @MODELS.register("tiny")      # registered as "tiny"
    def build_tiny(num_classes: int = 10) -> nn.Module: ...

and are looked up by name with :meth:`Registry.get`, which names the registered entries when
the name is unknown. A name is registered once: registering it again is an error (two
definitions of one name are a bug, never an override). Lookups never import anything: an
object is in a registry only once the module that defines it has been imported.

Registries of this package: the method families (:mod:`dynaconv.families`,
``register_family``), the networks (:mod:`dynaconv.models`, ``register_model``) and the
reference-checkpoint loaders (:mod:`dynaconv.compat`, ``register_reference_layer`` and
``register_reference_model``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Registered objects by name, in the order of registration.

    Args:
        kind: what the entries are, singular (``"model"``); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self.view: Mapping[str, T] = MappingProxyType(self._entries)
        """A read-only, live mapping name -> object."""

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name``; returns ``obj``.

        ``ValueError`` when ``name`` is not a non-empty string without surrounding spaces or
        is already registered.
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(
                f"a {self.kind} name must be a non-empty string without surrounding spaces, "
                f"got {name!r}"
            )
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (to {self._entries[name]!r}); "
                "every name is registered once"
            )
        self._entries[name] = obj
        return obj

    @overload
    def register(self, name_or_obj: str) -> Callable[[F], F]: ...

    @overload
    def register(self, name_or_obj: F) -> F: ...

    def register(self, name_or_obj: Any) -> Any:
        """Decorator registering a function or class.

        ``@registry.register`` registers it under its ``__name__``;
        ``@registry.register("name")`` under ``name``. Either returns the object unchanged.
        """
        if isinstance(name_or_obj, str):
            name = name_or_obj

            def decorator(obj: F) -> F:
                self.add(name, obj)  # type: ignore[arg-type]
                return obj

            return decorator
        name = getattr(name_or_obj, "__name__", None)
        if name is None:
            raise TypeError(
                f"register a {self.kind} as @register('name') or on a named function or class, "
                f"got {name_or_obj!r}"
            )
        return self.add(name, name_or_obj)

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its object (for plugins and tests that register
        temporarily); ``ValueError`` listing the names when it is not registered."""
        obj = self.get(name)
        del self._entries[name]
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``ValueError`` listing the names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}"
            ) from None

    def names(self, pattern: str | None = None) -> list[str]:
        """The registered names, sorted; with ``pattern`` only those matching it
        (shell-style wildcards, e.g. ``"condensenet*"``)."""
        names = sorted(self._entries)
        return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The names in the order of registration."""
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
