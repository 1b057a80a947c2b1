"""The paper's G-ResNeXt networks (``G_ResNet`` of the DGConv repository) loaded into
:mod:`dynaconv.models.g_resnext`. Each DGConv layer's entries are renamed as the layer's
loader does (:func:`dynaconv.layers.dgconv.reference.native_layer_state`, which also checks
the constant buffers ``D`` and ``I`` and drops them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.dgconv.reference import native_layer_state
from ..reference import register_reference_model

__all__ = ["g_resnext50_from_reference", "g_resnext101_from_reference"]


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
        native.update(native_layer_state(state_dict, prefix))
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
