"""Reference layout of CondConv (the ``CondConv2D`` quoted in the CondConv seed document).

The reference holds ``weight`` ``(E, Cout, Cin/groups, k, k)``, a single bias ``(Cout,)`` that
is **not** mixed per expert, and its routing function as ``_routing_fn.fc``. It is loaded as a
:class:`~dynaconv.layers.condconv.CondConv2d` with ``bias_per_expert=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ...reference import (
    check_config,
    check_state_keys,
    conv_arguments,
    register_reference_layer,
)
from .layer import CondConv2d

__all__ = ["layer_from_reference"]

_ARGS = conv_arguments(without={"bias", "padding_mode"})
_RENAMES = {
    "weight": "weight",
    "bias": "bias",
    "_routing_fn.fc.weight": "routing.fc.weight",
    "_routing_fn.fc.bias": "routing.fc.bias",
}


@register_reference_layer("condconv")
def layer_from_reference(config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> CondConv2d:
    """A :class:`CondConv2d` equal to the reference layer built with ``config``.

    ``config`` holds the reference's constructor arguments (``num_experts`` and ``bias``
    included; ``dropout_rate`` becomes ``routing_dropout``); a config without ``bias`` gets
    the bias the state dict has. The state dict must hold exactly the reference's keys.
    """
    known = {*_ARGS, "num_experts", "bias", "dropout_rate", "padding_mode"}
    check_config(config, known, layout="reference CondConv2D")
    bias = bool(config.get("bias", "bias" in state_dict))
    required = set(_RENAMES) - (set() if bias else {"bias"})
    check_state_keys(state_dict, required, layout="reference CondConv2D")
    weight = state_dict["weight"]
    num_experts = int(config.get("num_experts", weight.shape[0]))
    layer = CondConv2d(
        **{k: config[k] for k in _ARGS if k in config},
        padding_mode=config.get("padding_mode", "zeros"),
        bias=bias,
        dtype=weight.dtype,
        num_experts=num_experts,
        routing_dropout=float(config.get("dropout_rate", 0.0)),
        bias_per_expert=False,
    )
    layer.load_state_dict({_RENAMES[k]: v for k, v in state_dict.items()})
    return layer
