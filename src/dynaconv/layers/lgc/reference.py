"""The paper's learned group convolution (``LearnedGroupConv`` of the CondenseNet
repository) loaded into native modules: ``dynaconv.compat.layer_from_reference("lgc", config,
state_dict)``; :func:`lgc_state_from_reference` converts one layer's entries (the CondenseNet
loader of :mod:`dynaconv.compat.lgc` uses it for every layer of a network).

Key mapping (reference -> native): ``<lgc>.norm.*`` -> the BN before the LGC;
``<lgc>.conv.weight`` -> ``<lgc>.dense_weight``; ``<lgc>._mask`` ``(Cout, Cin, kh, kw)`` ->
``<lgc>.mask`` ``(Cout, Cin)`` (boolean, equal over the taps); ``<lgc>._stage`` ->
``<lgc>.stage``; ``_count`` (columns dropped per group) is checked against the mask.
Checkpoints without these buffers load with all-ones masks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...reference import (
    BATCHNORM_KEYS,
    check_config,
    check_state_keys,
    conv_arguments,
    register_reference_layer,
)
from .layer import LearnedGroupConv2d, check_condensation_state

__all__ = ["layer_from_reference", "lgc_state_from_reference"]


def _lgc_buffers(
    prefix: str, state: Mapping[str, Tensor], cin: int, groups: int, condense_factor: int
):
    """Native ``mask``/``stage`` from the reference ``_mask``/``_stage``/``_count`` (or defaults).

    Raises ``ValueError`` naming the reference key when they describe a state condensation
    cannot reach (see :func:`~dynaconv.layers.lgc.check_condensation_state`).
    """
    weight = state[f"{prefix}conv.weight"]
    cout = weight.shape[0]
    mask_key, stage_key = f"{prefix}_mask", f"{prefix}_stage"
    if mask_key not in state:
        mask = torch.ones(cout, cin, dtype=torch.bool)
    else:
        raw = state[mask_key]
        if raw.shape[:2] != (cout, cin):
            raise ValueError(
                f"{mask_key} must have shape (out_channels, in_channels, kh, kw) with "
                f"(out_channels, in_channels) = {(cout, cin)}, got {tuple(raw.shape)}"
            )
        flat = raw.reshape(cout, cin, -1)
        if not bool((flat == flat[..., :1]).all()) or not bool(((raw == 0) | (raw == 1)).all()):
            raise ValueError(f"{mask_key} must be 0/1 and equal over the kernel taps")
        mask = flat[..., 0] == 1
    stage = state.get(stage_key, torch.zeros(1))
    check_condensation_state(
        mask,
        stage,
        learned_groups=groups,
        condense_factor=condense_factor,
        mask_key=mask_key,
        stage_key=stage_key,
    )
    if f"{prefix}_count" in state:
        count = int(state[f"{prefix}_count"].reshape(-1)[0])
        dropped = int((~mask[:groups]).sum(1).max())
        if dropped != count:
            raise ValueError(
                f"{prefix}_count = {count} but the mask drops {dropped} columns per group"
            )
    return mask, torch.tensor(int(stage.reshape(-1)[0]), dtype=torch.long)


def lgc_state_from_reference(
    prefix: str,
    target: str,
    norm_target: str,
    state: Mapping[str, Tensor],
    groups: int,
    condense_factor: int,
) -> dict[str, Tensor]:
    """The native entries of the reference ``LearnedGroupConv`` at ``prefix``: its kernel,
    ``mask`` and ``stage`` under ``target``, its BN under ``norm_target`` (``ValueError`` for a
    state condensation cannot reach)."""
    weight = state[f"{prefix}conv.weight"]
    mask, stage = _lgc_buffers(prefix, state, weight.shape[1], groups, condense_factor)
    out = {f"{target}dense_weight": weight, f"{target}mask": mask, f"{target}stage": stage}
    for key in BATCHNORM_KEYS:
        if f"{prefix}norm.{key}" in state:
            out[f"{norm_target}{key}"] = state[f"{prefix}norm.{key}"]
    return out


@register_reference_layer("lgc")
def layer_from_reference(config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> nn.Module:
    """The reference ``LearnedGroupConv`` (BN-ReLU-dropout-masked conv) as native modules.

    ``config``: ``in_channels, out_channels, kernel_size, stride, padding, dilation, groups
    (the learned groups), condense_factor, dropout_rate``. Returns
    ``Sequential(norm=BatchNorm2d, relu=ReLU, conv=LearnedGroupConv2d)`` whose layer computes
    the reference's group lasso (``reference_lasso=True``). The state dict must hold the
    reference's keys (``_mask``, ``_stage``, ``_count`` and the BN's ``num_batches_tracked``
    may be left out: a checkpoint without them loads with all-ones masks at stage 0).
    """
    known = {*conv_arguments(without={"bias", "padding_mode"}), "condense_factor", "dropout_rate"}
    check_config(config, known, layout="reference LearnedGroupConv")
    check_state_keys(
        state_dict,
        {"conv.weight", *(f"norm.{k}" for k in BATCHNORM_KEYS[:4])},
        {"norm.num_batches_tracked", "_mask", "_stage", "_count"},
        layout="reference LearnedGroupConv",
    )
    groups = config.get("groups", 1)
    factor = config.get("condense_factor") or groups
    dtype = state_dict["conv.weight"].dtype
    layer = LearnedGroupConv2d(
        config["in_channels"],
        config["out_channels"],
        config["kernel_size"],
        config.get("stride", 1),
        config.get("padding", 0),
        config.get("dilation", 1),
        bias=False,
        dtype=dtype,
        learned_groups=groups,
        condense_factor=factor,
        dropout=config.get("dropout_rate", 0.0),
        reference_lasso=True,
    )
    module = nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm2d(config["in_channels"], dtype=dtype),
            relu=nn.ReLU(inplace=True),
            conv=layer,
        )
    )
    module.load_state_dict(
        lgc_state_from_reference("", "conv.", "norm.", state_dict, groups, layer.condense_factor)
    )
    return module
