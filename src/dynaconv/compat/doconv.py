"""Reference layout of DO-Conv (class ``DOConv2d`` of the paper's repository)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..layers.doconv import DOConv2d

_ARGS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def layer_from_reference(config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> DOConv2d:
    """A :class:`DOConv2d` from the reference's arguments (its ``bias`` defaults to False)."""
    unknown = set(config) - {*_ARGS, "bias", "D_mul"}
    if unknown:
        raise ValueError(f"unknown reference DOConv2d argument(s): {sorted(unknown)}")
    if "W" not in state_dict:
        raise ValueError(
            f"not a reference DOConv2d state dict: no 'W' among its keys {sorted(state_dict)[:8]}"
        )
    kwargs = {k: config[k] for k in _ARGS if k in config}
    kernel = config["kernel_size"]
    kernel_numel = kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]
    # The reference silently ignores D_mul for 1x1 kernels and defaults bias to False.
    d_mul = config.get("D_mul") if kernel_numel > 1 else None
    layer = DOConv2d(
        **kwargs, bias=bool(config.get("bias", False)), D_mul=d_mul, dtype=state_dict["W"].dtype
    )
    state = {k: v for k, v in state_dict.items() if k != "d_diag"}
    if (
        "d_diag" in state_dict
        and layer.D_diag is not None
        and not torch.equal(state_dict["d_diag"].to(layer.D_diag.dtype), layer.D_diag)
    ):
        raise ValueError(
            "reference d_diag differs from the constant DO-Conv defines; not a DOConv2d state dict?"
        )
    layer.load_state_dict(state)
    return layer
