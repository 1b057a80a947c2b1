"""Reference layouts of DGConv (class ``DGConv2d`` and ``G_ResNet`` of the paper's repository).

The reference layer stores ``gate``, ``conv.weight``, ``conv.bias`` (when ``bias``) and two
constant ``2 x 2`` buffers ``D = eye(2)`` and ``I = ones(2, 2)``; they are checked and dropped.
Its forward returns ``(output, regulariser)``; the native layer returns the output and gives
the regulariser through ``aux_loss()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.dgconv.layer import GroupableConv2d
from ._keys import check_config, check_state_keys, conv_arguments
from ._registry import register_reference_layer, register_reference_model

__all__ = ["g_resnext50_from_reference", "g_resnext101_from_reference", "layer_from_reference"]

_ARGS = conv_arguments(without={"groups", "bias", "padding_mode"})


def _check_constants(state_dict: Mapping[str, Tensor], prefix: str) -> None:
    expected = {"D": torch.eye(2), "I": torch.ones(2, 2)}
    for name, value in expected.items():
        key = prefix + name
        if key in state_dict and not torch.equal(state_dict[key].float().cpu(), value):
            raise ValueError(
                f"reference buffer {key!r} differs from the constant DGConv2d defines "
                f"({name} = {value.tolist()}); not a DGConv2d state dict?"
            )


def _native_layer_state(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The reference layer's entries under ``prefix``, renamed to :class:`GroupableConv2d`'s."""
    _check_constants(state_dict, prefix)
    renames = {"gate": "gate", "conv.weight": "dense_weight", "conv.bias": "bias"}
    return {
        prefix + new: state_dict[prefix + old]
        for old, new in renames.items()
        if prefix + old in state_dict
    }


@register_reference_layer("dgconv")
def layer_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> GroupableConv2d:
    """A :class:`GroupableConv2d` from the reference's arguments.

    The reference's ``bias`` defaults to True, so a layer built with its defaults saves
    ``conv.bias``; a config without ``bias`` gets the bias the state dict has. The state dict
    must hold exactly the reference's keys (the constant buffers ``D`` and ``I`` may be left
    out).
    """
    check_config(config, {*_ARGS, "bias", "sort"}, layout="reference DGConv2d")
    bias = bool(config.get("bias", "conv.bias" in state_dict))
    required = {"gate", "conv.weight"} | ({"conv.bias"} if bias else set())
    check_state_keys(state_dict, required, {"D", "I"}, layout="reference DGConv2d")
    kwargs = {k: config[k] for k in _ARGS if k in config}
    layer = GroupableConv2d(
        **kwargs,
        bias=bias,
        sort=bool(config.get("sort", False)),
        dtype=state_dict["conv.weight"].dtype,
    )
    layer.load_state_dict(_native_layer_state(state_dict))
    return layer


def _model_from_reference(
    arch: str, config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> nn.Module:
    from ..models.g_resnext import g_resnext50, g_resnext101

    build = {"g_resnext50": g_resnext50, "g_resnext101": g_resnext101}[arch]
    num_classes = int(config.get("num_classes", state_dict["fc.weight"].shape[0]))
    if state_dict["fc.weight"].shape[0] != num_classes:
        raise ValueError(
            f"config num_classes={num_classes} but fc.weight has {state_dict['fc.weight'].shape[0]} rows"
        )
    native: dict[str, Tensor] = {}
    layer_prefixes = {k[: -len("gate")] for k in state_dict if k.endswith("conv2.gate")}
    for prefix in layer_prefixes:
        native.update(_native_layer_state(state_dict, prefix))
    for key, value in state_dict.items():
        if not any(key.startswith(p) for p in layer_prefixes):
            native[key] = value
    with torch.device("meta"):
        model = build(num_classes=num_classes)
    model = model.to_empty(device="cpu").to(state_dict["fc.weight"].dtype)
    model.load_state_dict(native)
    return model


@register_reference_model("g_resnext50")
def g_resnext50_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """G-ResNeXt-50 (32x4d widths) from a reference ``g_resnext50`` state dict."""
    return _model_from_reference("g_resnext50", config, state_dict)


@register_reference_model("g_resnext101")
def g_resnext101_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """G-ResNeXt-101 (32x8d widths) from a reference ``g_resnext101`` state dict."""
    return _model_from_reference("g_resnext101", config, state_dict)
