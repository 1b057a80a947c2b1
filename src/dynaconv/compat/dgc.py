"""Load the DGC reference code's layers and networks (``DynamicMultiHeadConv``, DyDenseNet,
DyResNet-18) into native dynaconv modules.

The reference layer holds its own BN and ReLU before the heads and keeps each head as a
``headconv_{i}`` module with ``conv.weight`` ``(Cout/h, Cin, k, k)``, ``fc1.weight``
``(R, Cin)``, ``fc2.weight`` ``(Cin, R)`` and ``fc2.bias``; ``_inactive_channels`` is a float
``(1,)`` buffer. Natively the BN-ReLU belongs to the network, the heads' kernels are one
``weight`` in the interleaved output order (row ``j*h + i`` is head ``i``'s row ``j``), the
saliency generators are stacked ``(h, ...)`` parameters, and the reference's squeeze rate is
halved for ``Cin < 80`` (applied here, and by the paper networks' ``reference_squeeze``).

The loaders keep the dtype of the state dict (that of its convolution kernels), read the
saliency generators' hidden width from ``fc1.weight``, the zero width that the reference makes
when ``Cin // squeeze_rate == 0`` included (the saliency is then ``relu(fc2 bias)``), and raise
``ValueError`` naming every missing and every unused key of the reference state dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.dgc.layer import DynamicGroupConv2d, reference_squeeze_rate
from ..models.dydensenet import DyDenseNet
from ..models.dyresnet import DyResNet
from ._keys import check_config, conv_arguments
from ._registry import register_reference_layer, register_reference_model

__all__ = [
    "dgc_state_from_reference",
    "dydensenet_from_reference",
    "dyresnet18_from_reference",
    "layer_from_reference",
]

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_HEAD_KEYS = ("conv.weight", "fc1.weight", "fc2.weight", "fc2.bias")
_LAYER_ARGS = (
    *conv_arguments(without={"groups", "bias", "padding_mode"}),
    "heads",
    "squeeze_rate",
    "gate_factor",
)


class _TrackedState(Mapping[str, Tensor]):
    """A read-only view of a reference state dict that records which keys were read."""

    def __init__(self, state_dict: Mapping[str, Tensor]) -> None:
        self._state = state_dict
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Tensor:
        value = self._state[key]
        self.used.add(key)
        return value

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def check_all_used(self, what: str) -> None:
        unused = sorted(set(self._state) - self.used)
        if unused:
            raise ValueError(f"unexpected key(s) in the reference {what} state dict: {unused}")


def _state_dtype(state_dict: Mapping[str, Tensor], key: str) -> torch.dtype:
    """The dtype the loaded module gets: that of the reference tensor ``key`` (a conv kernel)."""
    if key not in state_dict:
        raise ValueError(f"missing key(s) in the reference state dict: ['{key}']")
    dtype = state_dict[key].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"reference tensor {key} must be floating point, got {dtype}")
    return dtype


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
    required += [f"{prefix}norm.{k}" for k in _BN_KEYS[:-1]]
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
    bn = {k: state_dict[f"{prefix}norm.{k}"] for k in _BN_KEYS if f"{prefix}norm.{k}" in state_dict}
    return bn, layer


def _rename(state_dict: Mapping[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    return {new + k[len(old) :]: state_dict[k] for k in state_dict if k.startswith(old)}


def _with_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


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
        dtype=_state_dtype(state_dict, "headconv_0.conv.weight"),
        heads=heads,
        squeeze_rate=squeeze,
        gate_factor=config.get("gate_factor", 0.25),
        hidden_width=cin // squeeze,
    )
    norm = nn.BatchNorm2d(cin, dtype=conv.weight.dtype)
    module = nn.Sequential(OrderedDict(norm=norm, relu=nn.ReLU(inplace=True), conv=conv))
    bn, layer = dgc_state_from_reference(state_dict)
    module.load_state_dict(_with_prefix(bn, "norm.") | _with_prefix(layer, "conv."))
    return module


def _check_keys(state_dict: Mapping[str, Tensor], heads: int) -> None:
    """ValueError naming the missing and the unexpected keys of a reference layer's state."""
    expected = {"_inactive_channels", *(f"norm.{k}" for k in _BN_KEYS)}
    expected |= {f"headconv_{i}.{k}" for i in range(heads) for k in _HEAD_KEYS}
    missing = sorted(expected - set(state_dict) - {"norm.num_batches_tracked"})
    extra = sorted(set(state_dict) - expected)
    if missing or extra:
        raise ValueError(
            f"the reference DGC layer state dict (heads={heads}) does not match: "
            f"missing key(s) {missing}, unexpected key(s) {extra}"
        )


def _convert_dgc(
    state_dict: Mapping[str, Tensor], ref_prefix: str, bn_prefix: str, conv_prefix: str
) -> dict[str, Tensor]:
    bn, layer = dgc_state_from_reference(state_dict, ref_prefix)
    return _with_prefix(bn, bn_prefix) | _with_prefix(layer, conv_prefix)


@register_reference_model("dydensenet")
def dydensenet_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> DyDenseNet:
    """The reference ``DydenseNet`` built from its arguments (``stages, growth, bottleneck,
    group_3x3, heads, squeeze_rate, gate_factor, data, num_classes``) with ``state_dict``."""
    config = dict(config)
    dtype = _state_dtype(state_dict, "features.init_conv.weight")
    state_dict = _TrackedState(state_dict)
    model = DyDenseNet(
        list(config["stages"]),
        list(config["growth"]),
        num_classes=config.get("num_classes", 10),
        data=config.get("data", "cifar10"),
        bottleneck=config.get("bottleneck", 4),
        group_3x3=config.get("group_3x3", 4),
        heads=config.get("heads", 4),
        squeeze_rate=config.get("squeeze_rate", 16),
        gate_factor=config.get("gate_factor", 0.25),
        reference_squeeze=True,
    ).to(dtype)
    native: dict[str, Tensor] = {}
    native |= _rename(state_dict, "features.init_conv.", "features.init_conv.")
    for name, _ in model.named_modules():
        if not name.split(".")[-1].startswith("denselayer_"):
            continue
        native |= _convert_dgc(state_dict, f"{name}.conv_1.", f"{name}.norm_1.", f"{name}.conv_1.")
        native |= _rename(state_dict, f"{name}.conv_2.norm.", f"{name}.norm_2.")
        native |= _rename(state_dict, f"{name}.conv_2.conv.", f"{name}.conv_2.")
    native |= _rename(state_dict, "bn_last.", "norm_last.")
    native |= _rename(state_dict, "classifier.", "classifier.")
    state_dict.check_all_used("DydenseNet")
    model.load_state_dict(native)
    return model


@register_reference_model("dyresnet18")
def dyresnet18_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> DyResNet:
    """The reference ``dyresnet18(args)`` (``heads, squeeze_rate, gate_factor``) with
    ``state_dict``; the number of classes is read from ``fc.weight``."""
    config = dict(config)
    dtype = _state_dtype(state_dict, "conv1.weight")
    if "fc.weight" not in state_dict:
        raise ValueError("missing key(s) in the reference state dict: ['fc.weight']")
    state_dict = _TrackedState(state_dict)
    model = DyResNet(
        (2, 2, 2, 2),
        int(state_dict["fc.weight"].shape[0]),
        heads=config.get("heads", 4),
        squeeze_rate=config.get("squeeze_rate", 16),
        gate_factor=config.get("gate_factor", 0.45),
        reference_squeeze=True,
    ).to(dtype)
    native: dict[str, Tensor] = {}
    for key in ("conv1.", "bn1.", "fc."):
        native |= _rename(state_dict, key, key)
    for layer in range(1, 5):
        for block in range(2):
            name = f"layer{layer}.{block}."
            for conv in ("conv1", "conv2"):
                native |= _convert_dgc(
                    state_dict, f"{name}{conv}.", f"{name}{conv}.norm.", f"{name}{conv}.conv."
                )
            for bn in ("bn1.", "bn2."):
                native |= _rename(state_dict, name + bn, name + bn)
            if f"{name}downsample.0.headconv_0.conv.weight" in state_dict:
                native |= _convert_dgc(
                    state_dict,
                    f"{name}downsample.0.",
                    f"{name}downsample.0.norm.",
                    f"{name}downsample.0.conv.",
                )
                native |= _rename(state_dict, f"{name}downsample.1.norm.", f"{name}downsample.1.")
    state_dict.check_all_used("dyresnet18")
    model.load_state_dict(native)
    return model
