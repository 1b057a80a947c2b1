"""How names in a configuration become code: only through the libraries' model registries.

A configuration (a recipe, ``--set``, the ``config.yaml`` of a run or deploy folder, the
configuration stored in a checkpoint or in a safetensors file's metadata) is data. It may come
from anyone, so nothing in it is ever imported or called by name: ``model.name`` resolves in
:func:`model_builder` and only among

1. dynaconv's networks (:func:`dynaconv.models.list_models`, registered with
   :func:`~dynaconv.models.register_model`);
2. torchvision's classification models (``torchvision.models.list_models(module=
   torchvision.models)``; detection and segmentation builders would download backbone weights);
3. timm's registry when timm is installed (``timm.list_models()``, built by
   ``timm.create_model(name, pretrained=False)``).

``"module:callable"`` strings or dotted paths are never imported. Keyword arguments that make a
registry load or download weights (``weights``, ``pretrained``, ``checkpoint_path``, ...) are
refused: a configuration never fetches or reads another file. To train a network of your own,
pass it to :class:`~dynaconv.train.engine.Trainer` from Python (``network=``).

:func:`model_builder` is the single place where a configured name becomes a callable.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import ConfigError

__all__ = ["check_convert_options", "check_model_kwargs", "known_model", "model_builder"]

#: Builder keyword arguments that load or download weights, per registry (always refused).
WEIGHT_LOADING_KWARGS: dict[str, tuple[str, ...]] = {
    "torchvision": ("weights", "weights_backbone"),
    "timm": (
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
    ),
}


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of the network called ``name`` in one of the registries (module docstring)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"model.name must be a registered model name, got {name!r}")
    import dynaconv.models

    if name in dynaconv.models.MODELS:
        return dynaconv.models.get_model_builder(name)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model_builder(name)
    timm = _timm()
    if timm is not None and name in timm.list_models():
        return functools.partial(timm.create_model, name, pretrained=False)
    raise ConfigError(
        f"model.name {name!r} is not a registered model: use a name of "
        f"dynaconv.models.list_models() ({', '.join(dynaconv.models.list_models())}), "
        "a torchvision classification model "
        "or a name of timm.list_models(); import strings are never resolved (train a network "
        "of your own from Python with Trainer(config, network=...))"
    )


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        return None
    return timm


def known_model(name: str) -> bool:
    """Whether :func:`model_builder` resolves ``name`` (without building it)."""
    try:
        model_builder(name)
    except ConfigError:
        return False
    return True


def _registry(builder: Callable[..., nn.Module]) -> str:
    target = builder.func if isinstance(builder, functools.partial) else builder
    return (getattr(target, "__module__", "") or "").split(".")[0]


def _named_parameters(
    function: Callable[..., Any], skip: int = 0, open_kwargs: bool = True
) -> set[str] | None:
    """Keyword names ``function`` accepts; None when it takes ``**kwargs`` and ``open_kwargs``
    says those are passed on (not just collected to be refused)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())[skip:]
    except (TypeError, ValueError):
        return None
    if open_kwargs and any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse ``model.kwargs`` keys the builder of ``name`` does not take or that load weights."""
    builder = model_builder(name)
    refused = WEIGHT_LOADING_KWARGS.get(_registry(builder), ())
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigError(f"model.kwargs keys must be strings, got {key!r}")
        if key in refused:
            raise ConfigError(
                f"model.kwargs.{key} is not allowed: a configuration never loads or downloads "
                "weights (models are built with random weights; load weights from Python)"
            )
    accepted = _named_parameters(builder)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"model.kwargs.{unknown[0]} is not an argument of {name} "
            f"(it takes {', '.join(sorted(accepted)) or 'no arguments'})"
        )


def check_convert_options(method: str, options: Mapping[str, Any]) -> None:
    """Refuse ``model.convert.options`` keys that ``method``'s ``from_conv`` does not take
    (its layer's ``conversion_options()``, the layer contract)."""
    from dynaconv.lifecycle import layer_class

    accepted = set(layer_class(method).conversion_options())
    for key in options:
        if key not in accepted:
            raise ConfigError(
                f"model.convert.options.{key} is not an option of {method} "
                f"(its options: {', '.join(sorted(accepted)) or 'none'})"
            )
