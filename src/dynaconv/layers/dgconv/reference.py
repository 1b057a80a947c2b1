"""The paper's DGConv layer (class ``DGConv2d`` of its repository) loaded into
:class:`GroupableConv2d`: ``dynaconv.compat.layer_from_reference("dgconv", config, state_dict)``;
:func:`native_layer_state` renames one layer's entries (the G-ResNeXt loaders of
:mod:`dynaconv.compat.dgconv` use it for every layer of a network).

The reference layer stores ``gate``, ``conv.weight``, ``conv.bias`` (when ``bias``) and two
constant ``2 x 2`` buffers ``D = eye(2)`` and ``I = ones(2, 2)``; they are checked and dropped.
Its forward returns ``(output, regulariser)``; the native layer returns the output and gives
the regulariser through ``aux_loss()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...reference import (
    check_config,
    check_state_keys,
    conv_arguments,
    register_reference_layer,
)
from .layer import GroupableConv2d

__all__ = ["layer_from_reference", "native_layer_state"]

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


def native_layer_state(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
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
    layer.load_state_dict(native_layer_state(state_dict))
    return layer
