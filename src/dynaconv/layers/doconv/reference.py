"""The paper's DO-Conv layer (class ``DOConv2d`` of its repository) loaded into
:class:`DOConv2d`: ``dynaconv.compat.layer_from_reference("doconv", config, state_dict)``.

The reference stores ``W``, ``D`` and the constant ``d_diag`` (both only for kernels with more
than one tap) and ``bias`` when it has one. Its constructor's ``bias`` defaults to True.
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
from .layer import DOConv2d

__all__ = ["layer_from_reference"]

_ARGS = conv_arguments(without={"bias"})


def _kernel_numel(kernel: Any) -> int:
    if isinstance(kernel, int):
        return kernel * kernel
    return int(kernel[0]) * int(kernel[1])


@register_reference_layer("doconv")
def layer_from_reference(config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> DOConv2d:
    """A :class:`DOConv2d` equal to the reference layer built with ``config``.

    ``bias`` follows the config; a config without it gets the bias the state dict has. (The
    reference defaults to ``bias=True``, so a layer built with its defaults saves a ``bias``
    entry; a bias-less state dict can only come from ``bias=False``.) The state dict must hold
    exactly the reference's keys for that configuration.
    """
    check_config(config, {*_ARGS, "bias", "D_mul"}, layout="reference DOConv2d")
    if "W" not in state_dict:
        raise ValueError(
            "not a reference DOConv2d state dict: missing key(s) ['W'] among its keys "
            f"{sorted(state_dict)[:8]}"
        )
    if "kernel_size" not in config:
        raise ValueError("the reference DOConv2d configuration needs kernel_size")
    kernel_numel = _kernel_numel(config["kernel_size"])
    bias = bool(config.get("bias", "bias" in state_dict))
    required = {"W"} | ({"D"} if kernel_numel > 1 else set()) | ({"bias"} if bias else set())
    optional = {"d_diag"} if kernel_numel > 1 else set()
    check_state_keys(state_dict, required, optional, layout="reference DOConv2d")
    kwargs = {k: config[k] for k in _ARGS if k in config}
    # The reference silently ignores D_mul for 1x1 kernels.
    d_mul = config.get("D_mul") if kernel_numel > 1 else None
    layer = DOConv2d(**kwargs, bias=bias, D_mul=d_mul, dtype=state_dict["W"].dtype)
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
