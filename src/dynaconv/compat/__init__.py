"""Load the papers' released checkpoints into native dynaconv modules.

* :func:`load_checkpoint` reads a reference checkpoint safely (``weights_only=True``: a
  checkpoint never runs code) and returns its state dict, with the ``module.`` prefix of
  ``nn.DataParallel`` checkpoints removed, and its stored arguments when present.
* :func:`layer_from_reference` builds one layer from the reference class's constructor
  arguments and state dict. Methods: ``doconv``, ``condconv``, ``dgc``, ``dgconv``, ``lgc``.
* :func:`model_from_reference` builds a whole network from the reference's command-line
  arguments and state dict. Architectures: ``condensenet``, ``dydensenet``, ``dyresnet18``,
  ``g_resnext50``, ``g_resnext101``.

The returned modules' ``forward`` returns the reference's main output. Each loader registers
itself in its module (:func:`register_reference_layer`, :func:`register_reference_model`, from
:mod:`dynaconv.reference`): a family's layer loader in its folder,
``dynaconv/layers/<family>/reference.py``, the networks' loaders here;
:data:`LAYER_METHODS` and :data:`ARCHITECTURES` are read-only views of them.

Other sources of CondConv weights: :mod:`dynaconv.compat.timm` (timm's EfficientNet-CondConv
checkpoints, ``tf_`` and native, and timm's ``CondConv2d``; timm itself is not needed) and
:mod:`dynaconv.compat.tensorflow` (the paper's TensorFlow variables: ``condconv_kernel``,
``condconv_bias``, the routing dense layer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ..reference import (
    ARCHITECTURES,
    LAYER_METHODS,
    register_reference_layer,
    register_reference_model,
    resolve,
)

__all__ = [
    "ARCHITECTURES",
    "LAYER_METHODS",
    "ReferenceCheckpoint",
    "layer_from_reference",
    "load_checkpoint",
    "model_from_reference",
    "register_reference_layer",
    "register_reference_model",
    "strip_prefix",
]


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """The state dict without ``prefix`` on its keys (DataParallel checkpoints), when all have it
    (torch's ``consume_prefix_in_state_dict_if_present`` strips it from any key that has it)."""
    stripped = dict(state_dict)
    if stripped and all(k.startswith(prefix) for k in stripped):
        consume_prefix_in_state_dict_if_present(stripped, prefix)
    return stripped


def layer_from_reference(
    method: str, config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """A native layer equal to the reference ``method`` layer built with ``config``."""
    build = resolve(LAYER_METHODS, method, "method")
    return build(dict(config), strip_prefix(state_dict))


def model_from_reference(
    arch: str, config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """A native network equal to the reference ``arch`` built with ``config`` (its arguments)."""
    build = resolve(ARCHITECTURES, arch, "architecture")
    return build(dict(config), strip_prefix(state_dict))


@dataclass
class ReferenceCheckpoint:
    """What :func:`load_checkpoint` found: the state dict, the stored arguments, the rest."""

    state_dict: dict[str, Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


_STATE_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
_CONFIG_KEYS = ("args", "config", "arch_args")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _as_config(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    return {}


def load_checkpoint(path: str | os.PathLike[str]) -> ReferenceCheckpoint:
    """Read a reference checkpoint without running code (``torch.load(weights_only=True)``).

    Accepts a bare state dict or a dict holding one under ``state_dict``/``model``/... (the
    layouts the papers' training scripts save). Raises ``ValueError`` saying what was found
    when the layout is unknown, or when the file needs unpickling code (e.g. a pickled
    ``argparse.Namespace``: re-save its arguments as a dict).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise ValueError(
            f"{path} cannot be read as a weights-only checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). It may be truncated, not a torch "
            "checkpoint, or contain pickled objects that would run code"
        ) from error
    if _is_state_dict(obj):
        return ReferenceCheckpoint(strip_prefix(obj))
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if _is_state_dict(obj.get(key)):
                config = next((_as_config(obj[k]) for k in _CONFIG_KEYS if k in obj), {})
                extra = {k: v for k, v in obj.items() if k != key and k not in _CONFIG_KEYS}
                return ReferenceCheckpoint(strip_prefix(obj[key]), config, extra)
        found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:12])
        raise ValueError(
            f"{path}: unknown checkpoint layout; expected a state dict or a dict with one of "
            f"{list(_STATE_KEYS)}, found {{{found}}}"
        )
    raise ValueError(
        f"{path}: unknown checkpoint layout; expected a dict, found {type(obj).__name__}"
    )


# The loaders register themselves when their modules are imported: the layers' in their
# families' folders (``dynaconv/layers/<family>/reference.py``, imported with the family), the
# networks' here; ``compat.timm`` and ``compat.tensorflow`` need neither timm nor TensorFlow, so
# they are imported with the package.
from . import dgc, dgconv, lgc, tensorflow, timm  # noqa: E402, F401
