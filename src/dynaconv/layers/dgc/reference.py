"""The paper's DGC layer (``DynamicMultiHeadConv`` of its repository) loaded into native
modules: ``dynaconv.compat.layer_from_reference("dgc", config, state_dict)``;
:func:`dgc_state_from_reference` converts one layer's entries (the DyDenseNet and DyResNet-18
loaders of :mod:`dynaconv.compat.dgc` use it for every layer of a network).

The reference layer holds its own BN and ReLU before the heads and keeps each head as a
``headconv_{i}`` module with ``conv.weight`` ``(Cout/h, Cin, k, k)``, ``fc1.weight``
``(R, Cin)``, ``fc2.weight`` ``(Cin, R)`` and ``fc2.bias``; ``_inactive_channels`` is a float
``(1,)`` buffer. Natively the BN-ReLU belongs to the network, the heads' kernels are one
``weight`` in the interleaved output order (row ``j*h + i`` is head ``i``'s row ``j``), the
saliency generators are stacked ``(h, ...)`` parameters, and the reference's squeeze rate is
halved for ``Cin < 80`` (:func:`~dynaconv.layers.dgc.layer.reference_squeeze_rate`).

The loader keeps the dtype of the state dict (that of its convolution kernels), reads the
saliency generators' hidden width from ``fc1.weight``, the zero width that the reference makes
when ``Cin // squeeze_rate == 0`` included (the saliency is then ``relu(fc2 bias)``), and raises
``ValueError`` naming every missing and every unused key of the reference state dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...reference import (
    BATCHNORM_KEYS,
    add_prefix,
    check_config,
    conv_arguments,
    register_reference_layer,
    state_dtype,
)
from .layer import DynamicGroupConv2d, reference_squeeze_rate

__all__ = ["dgc_state_from_reference", "layer_from_reference"]

_HEAD_KEYS = ("conv.weight", "fc1.weight", "fc2.weight", "fc2.bias")
_LAYER_ARGS = (
    *conv_arguments(without={"groups", "bias", "padding_mode"}),
    "heads",
    "squeeze_rate",
    "gate_factor",
)


def _count_heads(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    heads = 0
    while f"{prefix}headconv_{heads}.conv.weight" in state_dict:
        heads += 1
    if heads == 0:
        raise ValueError(f"no '{prefix}headconv_0.conv.weight' in the reference state dict")
    return heads


def dgc_state_from_reference(
    state_dict: Mapping[str, Tensor], prefix: str = ""
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(bn_state, layer_state)``: the reference layer at ``prefix`` as a native BN and a
    native :class:`DynamicGroupConv2d` state dict.

    Raises ``ValueError`` naming the missing keys (a BN's ``num_batches_tracked`` is optional,
    as in PyTorch's own loading of old checkpoints)."""
    heads = _count_heads(state_dict, prefix)
    head = [f"{prefix}headconv_{i}." for i in range(heads)]
    required = [h + k for h in head for k in _HEAD_KEYS] + [f"{prefix}_inactive_channels"]
    required += [f"{prefix}norm.{k}" for k in BATCHNORM_KEYS[:-1]]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"missing key(s) in the reference DGC state dict: {missing}")
    kernels = torch.stack([state_dict[h + "conv.weight"] for h in head], dim=1)  # Co/h, h, ...
    layer = {
        "weight": kernels.flatten(0, 1),
        "fc1_weight": torch.stack([state_dict[h + "fc1.weight"] for h in head]),
        "fc2_weight": torch.stack([state_dict[h + "fc2.weight"] for h in head]),
        "fc2_bias": torch.stack([state_dict[h + "fc2.bias"] for h in head]),
        "inactive_channels": state_dict[f"{prefix}_inactive_channels"].reshape(()).round().long(),
    }
    bn = {
        k: state_dict[f"{prefix}norm.{k}"]
        for k in BATCHNORM_KEYS
        if f"{prefix}norm.{k}" in state_dict
    }
    return bn, layer


@register_reference_layer("dgc")
def layer_from_reference(config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> nn.Module:
    """``nn.Sequential(norm=BN, relu=ReLU, conv=DynamicGroupConv2d)`` equal to the reference
    ``DynamicMultiHeadConv(**config)`` with ``state_dict``: its main output (the reference
    also returns the lasso term, here the layer's ``aux_loss()``).

    Keeps the state dict's dtype; ``ValueError`` for unknown or missing arguments and for
    missing or unexpected keys (each named)."""
    config = dict(config)
    check_config(config, _LAYER_ARGS, layout="reference DynamicMultiHeadConv")
    absent = [k for k in ("in_channels", "out_channels", "kernel_size") if k not in config]
    if absent:
        raise ValueError(f"missing reference DynamicMultiHeadConv argument(s): {absent}")
    cin, cout = config["in_channels"], config["out_channels"]
    heads = config.get("heads", 4)
    squeeze = reference_squeeze_rate(cin, config.get("squeeze_rate", 16))
    _check_keys(state_dict, heads)
    conv = DynamicGroupConv2d(
        cin,
        cout,
        config["kernel_size"],
        config.get("stride", 1),
        config.get("padding", 0),
        config.get("dilation", 1),
        bias=False,
        dtype=state_dtype(state_dict, "headconv_0.conv.weight"),
        heads=heads,
        squeeze_rate=squeeze,
        gate_factor=config.get("gate_factor", 0.25),
        hidden_width=cin // squeeze,
    )
    norm = nn.BatchNorm2d(cin, dtype=conv.weight.dtype)
    module = nn.Sequential(OrderedDict(norm=norm, relu=nn.ReLU(inplace=True), conv=conv))
    bn, layer = dgc_state_from_reference(state_dict)
    module.load_state_dict(add_prefix(bn, "norm.") | add_prefix(layer, "conv."))
    return module


def _check_keys(state_dict: Mapping[str, Tensor], heads: int) -> None:
    """ValueError naming the missing and the unexpected keys of a reference layer's state."""
    expected = {"_inactive_channels", *(f"norm.{k}" for k in BATCHNORM_KEYS)}
    expected |= {f"headconv_{i}.{k}" for i in range(heads) for k in _HEAD_KEYS}
    missing = sorted(expected - set(state_dict) - {"norm.num_batches_tracked"})
    extra = sorted(set(state_dict) - expected)
    if missing or extra:
        raise ValueError(
            f"the reference DGC layer state dict (heads={heads}) does not match: "
            f"missing key(s) {missing}, unexpected key(s) {extra}"
        )
