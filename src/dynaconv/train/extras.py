"""The optional dependency groups ("extras") of the training system and the command line.

``pip install dynaconv`` installs the library only; the command line needs the ``train`` extra
(``pip install "dynaconv[train]"``) and ``dynaconv export`` also the ``export`` extra
(``--format pte``: the ``edge`` extra instead). Each command checks its extras first
(:func:`require_extras`), before it reads or writes any file, so a missing one is one line
naming what to install instead of a traceback half-way through.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from .errors import ConfigError

__all__ = ["EXTRAS", "MissingExtraError", "missing_modules", "require_extras", "yaml_module"]

#: Extra -> the modules it provides (import names; see pyproject.toml's optional dependencies).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("yaml", "tqdm", "safetensors", "tensorboard", "matplotlib", "sklearn"),
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "edge": ("executorch",),
}


class MissingExtraError(ConfigError):
    """A module of an optional dependency group is not installed."""


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` (a key of :data:`EXTRAS`) that cannot be imported."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {', '.join(EXTRAS)}, got {extra!r}")
    return [name for name in EXTRAS[extra] if not _importable(name)]


def require_extras(*extras: str, what: str = "this command") -> None:
    """Raise :class:`MissingExtraError` naming the extras to install when any module is absent."""
    lacking = {extra: missing_modules(extra) for extra in extras}
    lacking = {extra: names for extra, names in lacking.items() if names}
    if lacking:
        names = ", ".join(name for found in lacking.values() for name in found)
        groups = ",".join(lacking)
        raise MissingExtraError(
            f"{what} needs the {groups!r} extra (missing: {names}); "
            f'install it with: pip install "dynaconv[{groups}]"'
        )


def yaml_module() -> ModuleType:
    """PyYAML (the ``train`` extra), imported on first use so that ``--help`` works without it."""
    try:
        import yaml
    except ImportError:
        raise MissingExtraError(
            'configurations are YAML: install the "train" extra: pip install "dynaconv[train]"'
        ) from None
    return yaml
