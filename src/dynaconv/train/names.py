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

``"module:callable"`` strings or dotted paths are never imported.

**Model keyword arguments are an allowlist** (:func:`allowed_model_kwargs`), per registry:

* dynaconv: the arguments the builder declares (its named parameters; a builder that forwards
  ``**kwargs`` to the network class it returns also accepts that class's named constructor
  arguments);
* torchvision: ``num_classes`` and the architecture arguments listed for the builder's family
  in :data:`TORCHVISION_KWARGS` (the family is the ``torchvision.models`` module, e.g.
  ``resnet``); the builder is always called with ``weights=None``;
* timm: the arguments of :data:`TIMM_KWARGS`, built with ``pretrained=False``.

Any other key is refused, so a flag that loads weights (torchvision's ``weights`` or its
legacy ``pretrained``, timm's ``pretrained_cfg`` or ``checkpoint_path``, one added by a
future version) can never be set by a file: a configuration never fetches or reads another
file. To allow another architecture argument, add it from Python before the configuration
is read, e.g. ``allow_model_kwargs("torchvision", "resnet", "norm_layer")`` in a launcher
script that then calls :func:`dynaconv.cli.main`; to train a network of your own, pass
it to :class:`~dynaconv.train.engine.Trainer` from Python (``network=``) or register its
builder with :func:`dynaconv.models.register_model`.

:func:`model_builder` is the single place where a configured name becomes a callable.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import ConfigError, short_repr

__all__ = [
    "TIMM_KWARGS",
    "TORCHVISION_KWARGS",
    "allow_model_kwargs",
    "allowed_model_kwargs",
    "check_convert_options",
    "check_model_kwargs",
    "known_model",
    "model_builder",
]

#: torchvision: the architecture arguments a configuration may set, per family (the module
#: of ``torchvision.models`` that defines the builder); ``"*"`` applies to every family.
TORCHVISION_KWARGS: dict[str, set[str]] = {
    "*": {"num_classes"},
    "alexnet": {"dropout"},
    "convnext": {"stochastic_depth_prob", "layer_scale"},
    "densenet": {"bn_size", "drop_rate", "memory_efficient"},
    "efficientnet": {"dropout", "stochastic_depth_prob"},
    "googlenet": {"aux_logits", "transform_input", "init_weights", "dropout", "dropout_aux"},
    "inception": {"aux_logits", "transform_input", "init_weights", "dropout"},
    "mnasnet": {"dropout"},
    "mobilenetv2": {"width_mult", "round_nearest", "dropout"},
    "mobilenetv3": {"dropout", "reduced_tail", "dilated"},
    "resnet": {"zero_init_residual", "groups", "width_per_group", "replace_stride_with_dilation"},
    "squeezenet": {"dropout"},
    "vgg": {"init_weights", "dropout"},
    "vision_transformer": {"image_size", "dropout", "attention_dropout"},
}

#: timm: the architecture arguments a configuration may set (every model).
TIMM_KWARGS: set[str] = {"num_classes", "in_chans", "drop_rate", "drop_path_rate", "global_pool"}


def allow_model_kwargs(registry: str, family: str, *names: str) -> None:
    """Allow more architecture arguments in ``model.kwargs`` (from Python, module docstring).

    ``registry``: ``"torchvision"`` (``family``: a ``torchvision.models`` module name such as
    ``"resnet"``, or ``"*"``) or ``"timm"`` (``family`` is ignored). Only allow arguments that
    shape the network: an argument that loads or downloads weights defeats the allowlist.
    """
    if registry == "torchvision":
        TORCHVISION_KWARGS.setdefault(family, set()).update(names)
    elif registry == "timm":
        TIMM_KWARGS.update(names)
    else:
        raise ValueError(
            f"registry must be 'torchvision' or 'timm' (dynaconv builders declare their "
            f"arguments), got {registry!r}"
        )


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of the network called ``name`` in one of the registries (module docstring);
    torchvision and timm builders come with their weights switched off."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"model.name must be a registered model name, got {short_repr(name)}")
    import dynaconv.models

    if name in dynaconv.models.MODELS:
        return dynaconv.models.get_model_builder(name)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return functools.partial(torchvision.models.get_model_builder(name), weights=None)
    timm = _timm()
    if timm is not None and name in timm.list_models():
        return functools.partial(timm.create_model, name, pretrained=False)
    raise ConfigError(
        f"model.name {short_repr(name)} is not a registered model: use a name of "
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


def _named_parameters(function: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword names ``function`` accepts, and whether it also takes ``**kwargs``."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return set(), False
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _dynaconv_kwargs(builder: Callable[..., nn.Module]) -> set[str]:
    """The arguments a dynaconv builder declares; a builder forwarding ``**kwargs`` also
    declares the named constructor arguments of the class it returns (its annotation)."""
    named, forwards = _named_parameters(builder)
    if forwards:
        try:
            returned = typing.get_type_hints(builder).get("return")
        except Exception:  # an unresolvable annotation declares nothing more
            returned = None
        if isinstance(returned, type) and issubclass(returned, nn.Module):
            named |= _named_parameters(returned.__init__)[0] - {"self"}
    return named


def allowed_model_kwargs(name: str) -> set[str]:
    """The ``model.kwargs`` keys a configuration may set for the network ``name`` (the
    allowlist of the module docstring)."""
    builder = model_builder(name)
    registry = _registry(builder)
    if registry == "torchvision":
        target = builder.func if isinstance(builder, functools.partial) else builder
        family = target.__module__.rsplit(".", 1)[-1]
        return TORCHVISION_KWARGS["*"] | TORCHVISION_KWARGS.get(family, set())
    if registry == "timm":
        return set(TIMM_KWARGS)
    return _dynaconv_kwargs(builder)


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse ``model.kwargs`` keys outside the allowlist of ``name``
    (:func:`allowed_model_kwargs`)."""
    accepted = allowed_model_kwargs(name)
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigError(f"model.kwargs keys must be strings, got {short_repr(key)}")
        if key not in accepted:
            raise ConfigError(
                f"model.kwargs.{key[:60]} is not an allowed argument of {name} "
                f"(allowed: {', '.join(sorted(accepted)) or 'none'}); configurations never "
                "load weights (more: dynaconv.train.names.allow_model_kwargs)"
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
