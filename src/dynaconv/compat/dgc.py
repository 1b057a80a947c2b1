"""Load the DGC reference code's networks (DyDenseNet, DyResNet-18) into native dynaconv
modules; every ``DynamicMultiHeadConv`` in them converts as the layer's loader does
(:func:`dynaconv.layers.dgc.reference.dgc_state_from_reference`, which describes the layout).

The loaders keep the dtype of the state dict (that of the first convolution's kernel), apply
the reference's halved squeeze rate for ``Cin < 80`` (the paper networks'
``reference_squeeze``), and raise ``ValueError`` naming every missing and every unused key of
the reference state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..layers.dgc.reference import dgc_state_from_reference
from ..models.dydensenet import DyDenseNet
from ..models.dyresnet import DyResNet
from ..reference import add_prefix, register_reference_model, state_dtype

__all__ = ["dydensenet_from_reference", "dyresnet18_from_reference"]


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


def _rename(state_dict: Mapping[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    return {new + k[len(old) :]: state_dict[k] for k in state_dict if k.startswith(old)}


def _dgc_options(config: Mapping[str, Any], default_gate_factor: float) -> dict[str, Any]:
    """The reference networks' DGC options (their defaults: 4 heads, squeeze rate 16, and the
    network's gate factor), with the reference's squeeze rate rule."""
    return {
        "heads": config.get("heads", 4),
        "squeeze_rate": config.get("squeeze_rate", 16),
        "gate_factor": config.get("gate_factor", default_gate_factor),
        "reference_squeeze": True,
    }


def _convert_dgc(
    state_dict: Mapping[str, Tensor], ref_prefix: str, bn_prefix: str, conv_prefix: str
) -> dict[str, Tensor]:
    bn, layer = dgc_state_from_reference(state_dict, ref_prefix)
    return add_prefix(bn, bn_prefix) | add_prefix(layer, conv_prefix)


@register_reference_model("dydensenet")
def dydensenet_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> DyDenseNet:
    """The reference ``DydenseNet`` built from its arguments (``stages, growth, bottleneck,
    group_3x3, heads, squeeze_rate, gate_factor, data, num_classes``) with ``state_dict``."""
    config = dict(config)
    dtype = state_dtype(state_dict, "features.init_conv.weight")
    state_dict = _TrackedState(state_dict)
    model = DyDenseNet(
        list(config["stages"]),
        list(config["growth"]),
        num_classes=config.get("num_classes", 10),
        data=config.get("data", "cifar10"),
        bottleneck=config.get("bottleneck", 4),
        group_3x3=config.get("group_3x3", 4),
        **_dgc_options(config, default_gate_factor=0.25),
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
    dtype = state_dtype(state_dict, "conv1.weight")
    if "fc.weight" not in state_dict:
        raise ValueError("missing key(s) in the reference state dict: ['fc.weight']")
    state_dict = _TrackedState(state_dict)
    model = DyResNet(
        (2, 2, 2, 2),
        int(state_dict["fc.weight"].shape[0]),
        **_dgc_options(config, default_gate_factor=0.45),
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
