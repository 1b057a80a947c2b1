"""timm's CondConv checkpoints and layers, loaded into dynaconv (timm is not needed to load).

The only released CondConv weights usable from PyTorch are timm's: ``tf_efficientnet_cc_b0_4e``,
``tf_efficientnet_cc_b0_8e`` and ``tf_efficientnet_cc_b1_8e`` (ported from the paper's
TensorFlow checkpoints) and the native ``efficientnet_cc_*`` variants.

* :func:`model_from_timm` builds the equal :class:`~dynaconv.models.EfficientNetCondConv` from a
  timm model name and its state dict (or from a timm model itself), with the options that make
  it exact: BatchNorm eps (timm's native models use PyTorch's 1e-5, the ``tf_`` ones
  TensorFlow's 1e-3) and padding (the ``tf_`` ones pad TensorFlow's SAME in their strided
  convs, CondConv included: ``padding="same"``).
* :func:`state_dict_from_timm` only renames and reshapes the tensors: every key name differs,
  timm nests the blocks by stage (``blocks.5.2.*``, dynaconv numbers them: ``blocks.12.*``), and
  stores each CondConv expert bank flat, ``(E, prod(Cout, Cin/groups, kh, kw))``.
* :func:`layer_from_timm` builds the equal :class:`~dynaconv.layers.CondConv2d` of one timm
  ``CondConv2d`` (from the layer or from its constructor arguments and state dict).

timm's names and what they are: ``efficientnet_cc_b0_4e`` / ``_8e`` are CondConv-EfficientNet-B0
with 4 / 8 experts (:func:`~dynaconv.models.efficientnet_b0_condconv4` / ``8``);
``efficientnet_cc_b1_8e`` is B0's width with depth multiplier 1.1, the paper's
"CondConv-EfficientNet-B0-depth" (:func:`~dynaconv.models.efficientnet_b0_depth_condconv8`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..layers.condconv.layer import CondConv2d
from ..models import create_model
from ..models.efficientnet_condconv import EfficientNetCondConv
from ..reference import check_config, conv_arguments

__all__ = [
    "TIMM_MODELS",
    "TimmVariant",
    "layer_from_timm",
    "model_from_timm",
    "state_dict_from_timm",
    "timm_padding",
]


@dataclass(frozen=True)
class TimmVariant:
    """How a timm EfficientNet-CondConv maps onto dynaconv: builder and exact options."""

    builder: str
    bn_eps: float
    padding: str


_NATIVE_EPS, _TF_EPS = 1e-5, 1e-3

#: timm model name -> dynaconv builder (in :mod:`dynaconv.models`) and its exact options.
TIMM_MODELS: dict[str, TimmVariant] = {
    "efficientnet_cc_b0_4e": TimmVariant("efficientnet_b0_condconv4", _NATIVE_EPS, "symmetric"),
    "efficientnet_cc_b0_8e": TimmVariant("efficientnet_b0_condconv8", _NATIVE_EPS, "symmetric"),
    "efficientnet_cc_b1_8e": TimmVariant(
        "efficientnet_b0_depth_condconv8", _NATIVE_EPS, "symmetric"
    ),
    "tf_efficientnet_cc_b0_4e": TimmVariant("efficientnet_b0_condconv4", _TF_EPS, "same"),
    "tf_efficientnet_cc_b0_8e": TimmVariant("efficientnet_b0_condconv8", _TF_EPS, "same"),
    "tf_efficientnet_cc_b1_8e": TimmVariant("efficientnet_b0_depth_condconv8", _TF_EPS, "same"),
}

# timm module name -> dynaconv module name, outside the blocks and inside each kind of block.
_TOP = {
    "conv_stem": "stem.0",
    "bn1": "stem.1",
    "conv_head": "head.0",
    "bn2": "head.1",
    "classifier": "classifier",
}
_SE = {"se.conv_reduce": "se.reduce", "se.conv_expand": "se.expand"}
_DEPTHWISE_SEPARABLE = {  # the first stage: no expansion
    "conv_dw": "depthwise",
    "bn1": "depthwise_norm",
    "conv_pw": "project",
    "bn2": "project_norm",
    **_SE,
}
_INVERTED_RESIDUAL = {
    "conv_pw": "expand",
    "bn1": "expand_norm",
    "conv_dw": "depthwise",
    "bn2": "depthwise_norm",
    "conv_pwl": "project",
    "bn3": "project_norm",
    "routing_fn": "routing.fc",
    **_SE,
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")


def _variant_name(name: str) -> str:
    """``timm/tf_efficientnet_cc_b0_4e.in1k`` -> ``tf_efficientnet_cc_b0_4e``."""
    base = name.split("/")[-1].split(".")[0]
    if base not in TIMM_MODELS:
        raise ValueError(
            f"timm model name must be one of {sorted(TIMM_MODELS)} (optionally with a "
            f"'.tag'), got {name!r}"
        )
    return base


def _rename(module_and_param: str, table: Mapping[str, str], where: str) -> str:
    module, _, param = module_and_param.rpartition(".")
    if module not in table:
        raise ValueError(f"unexpected key in a timm EfficientNet-CondConv state dict: {where}")
    return f"{table[module]}.{param}"


def state_dict_from_timm(
    state_dict: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """timm's EfficientNet-CondConv state dict with dynaconv's key names.

    Blocks are numbered in timm's (stage, index) order. With ``reference`` (the target model's
    state dict), flat CondConv expert banks ``(E, P)`` are reshaped to the reference's
    ``(E, Cout, Cin/groups, kh, kw)`` (timm flattens each expert in that order) and every
    shape is checked; ``ValueError`` names the first key that does not fit.
    """
    blocks = sorted({(int(m[1]), int(m[2])) for k in state_dict if (m := _BLOCK_KEY.match(k))})
    number = {block: n for n, block in enumerate(blocks)}
    inverted = {
        (int(m[1]), int(m[2]))
        for k in state_dict
        if (m := _BLOCK_KEY.match(k)) and m[3].startswith("conv_pwl.")
    }
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            block = (int(match[1]), int(match[2]))
            table = _INVERTED_RESIDUAL if block in inverted else _DEPTHWISE_SEPARABLE
            new = f"blocks.{number[block]}.{_rename(match[3], table, key)}"
        else:
            new = _rename(key, _TOP, key)
        converted[new] = value
    if reference is not None:
        converted = _fit_shapes(converted, reference)
    return converted


def _fit_shapes(converted: dict[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    missing = sorted(set(reference) - set(converted))
    unexpected = sorted(set(converted) - set(reference))
    if missing or unexpected:
        raise ValueError(
            "the timm state dict does not fit the dynaconv model: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    fitted = {}
    for key, value in converted.items():
        shape = reference[key].shape
        if value.shape != shape:
            flat_bank = value.dim() == 2 and len(shape) == 5 and value.shape[0] == shape[0]
            if not (flat_bank and value.numel() == reference[key].numel()):
                raise ValueError(
                    f"{key}: the timm tensor has shape {tuple(value.shape)}, the dynaconv model "
                    f"expects {tuple(shape)}"
                )
            value = value.reshape(shape)
        fitted[key] = value
    return fitted


def model_from_timm(
    source: str | nn.Module,
    state_dict: Mapping[str, Tensor] | None = None,
    **options: Any,
) -> EfficientNetCondConv:
    """The :class:`~dynaconv.models.EfficientNetCondConv` equal to a timm EfficientNet-CondConv.

    ``source`` is a timm model name (one of :data:`TIMM_MODELS`, a ``.tag`` such as ``.in1k``
    allowed) with its ``state_dict``, or a timm model itself (its architecture name, state
    dict, BatchNorm eps and stem padding are read from it). ``options`` go to the builder
    (``impl``, ``dropout``...); the number of classes is the checkpoint's. The returned model
    is in eval mode, in the checkpoint's dtype.
    """
    if isinstance(source, nn.Module):
        if state_dict is not None:
            raise ValueError("pass either a timm model or a name with a state dict, not both")
        name = _variant_name(getattr(source, "pretrained_cfg", {}).get("architecture", ""))
        state_dict = source.state_dict()
        variant = TIMM_MODELS[name]
        stem = source.get_submodule("conv_stem")
        padding = "same" if tuple(stem.padding) == (0, 0) else "symmetric"
        variant = TimmVariant(variant.builder, float(source.get_submodule("bn1").eps), padding)
    else:
        if state_dict is None:
            raise ValueError(f"a state dict is needed with the model name {source!r}")
        variant = TIMM_MODELS[_variant_name(source)]
    if "classifier.weight" not in state_dict:
        raise ValueError("the timm state dict has no 'classifier.weight'")
    for fixed in ("bn_eps", "padding", "num_classes"):
        if fixed in options:
            raise ValueError(f"{fixed} is set by the timm checkpoint; it cannot be an option")
    classifier = state_dict["classifier.weight"]
    model = create_model(
        variant.builder,
        num_classes=classifier.shape[0],
        bn_eps=variant.bn_eps,
        padding=variant.padding,
        **options,
    ).to(classifier.dtype)
    model.load_state_dict(state_dict_from_timm(state_dict, model.state_dict()))
    return model.eval()


# --------------------------------------------------------------------------------------------
# One layer


def timm_padding(
    padding: Any, kernel_size: Any, stride: Any = 1, dilation: Any = 1
) -> tuple[int, int] | str:
    """dynaconv's ``padding`` for timm's ``padding`` argument of a conv.

    timm's rules: ``""`` (its default) pads ``((s - 1) + d (k - 1)) // 2`` on each side;
    ``"same"`` is TensorFlow's SAME (dynaconv's ``"same"``, at any stride); ``"valid"`` is 0;
    numbers are taken as they are.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "same":
            return "same"
        if mode == "valid":
            return (0, 0)
        if mode != "":
            raise ValueError(f"timm padding must be '', 'same', 'valid' or ints, got {padding!r}")
        pairs = zip(_pair(kernel_size), _pair(stride), _pair(dilation))
        return tuple(((s - 1) + d * (k - 1)) // 2 for k, s, d in pairs)  # type: ignore[return-value]
    return _pair(padding)


_TIMM_ARGS = (*conv_arguments(without={"padding_mode"}), "num_experts")


def _config_of(layer: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a timm ``CondConv2d`` module, read from its attributes."""
    try:
        config = {
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": tuple(layer.kernel_size),
            "stride": tuple(layer.stride),
            "padding": "same" if layer.dynamic_padding else tuple(layer.padding),
            "dilation": tuple(layer.dilation),
            "groups": layer.groups,
            "bias": layer.bias is not None,
            "num_experts": layer.num_experts,
        }
    except AttributeError as missing:
        raise ValueError(
            f"{type(layer).__name__} is not a timm CondConv2d (no attribute {missing.name!r})"
        ) from missing
    return config


def layer_from_timm(
    layer_or_config: nn.Module | Mapping[str, Any],
    state_dict: Mapping[str, Tensor] | None = None,
) -> CondConv2d:
    """The :class:`~dynaconv.layers.CondConv2d` equal to a timm ``CondConv2d``.

    Give the timm layer itself, or its constructor arguments (``in_channels``,
    ``out_channels``, ``kernel_size`` (3), ``stride`` (1), ``padding`` (``""``), ``dilation``
    (1), ``groups`` (1), ``bias`` (False), ``num_experts`` (4), as timm's defaults) and its state
    dict. timm's layer has no routing of its own (its block computes it), so the result has
    ``shared_routing=True`` and is called as ``layer(x, routing_weights=r)``; its biases are
    per expert, as timm's.
    """
    if isinstance(layer_or_config, nn.Module):
        if state_dict is not None:
            raise ValueError("pass either a timm layer or a config with a state dict, not both")
        config = _config_of(layer_or_config)
        state_dict = layer_or_config.state_dict()
    else:
        if state_dict is None:
            raise ValueError("a state dict is needed with a timm CondConv2d config")
        config = dict(layer_or_config)
        check_config(config, _TIMM_ARGS, layout="timm CondConv2d")
    kernel_size = config.get("kernel_size", 3)
    stride, dilation = config.get("stride", 1), config.get("dilation", 1)
    extra = set(state_dict) - {"weight", "bias"}
    if extra or "weight" not in state_dict:
        raise ValueError(
            f"a timm CondConv2d state dict holds 'weight' (and 'bias'), got {sorted(state_dict)}"
        )
    has_bias = bool(config.get("bias", False))
    if has_bias != ("bias" in state_dict):
        raise ValueError(f"config bias={has_bias} but the state dict has keys {sorted(state_dict)}")
    weight = state_dict["weight"]
    layer = CondConv2d(
        config["in_channels"],
        config["out_channels"],
        kernel_size,
        stride,
        timm_padding(config.get("padding", ""), kernel_size, stride, dilation),
        dilation,
        config.get("groups", 1),
        has_bias,
        dtype=weight.dtype,
        num_experts=config.get("num_experts", 4),
        shared_routing=True,
    )
    expected = layer.weight.shape
    if weight.dim() != 2 or tuple(weight.shape) != (expected[0], expected[1:].numel()):
        raise ValueError(
            f"timm CondConv2d weight must have shape (num_experts, Cout * Cin/groups * kh * kw) "
            f"= {(expected[0], expected[1:].numel())}, got {tuple(weight.shape)}"
        )
    converted = {"weight": weight.reshape(expected)}
    if has_bias:
        converted["bias"] = state_dict["bias"]
    layer.load_state_dict(converted)
    return layer
