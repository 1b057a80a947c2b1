"""BatchNorm folding shared by the deployed modules and networks.

An eval-mode ``nn.BatchNorm2d`` is a per-channel affine map ``y = x * scale + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``; a conv (or any layer
linear per output channel) followed by it is the same layer with its kernel rows scaled by
``scale`` and its bias ``b * scale + shift``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_batchnorm"]


def fold_batchnorm(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, shape ``(C,)`` each, with ``norm(x) == x * scale + shift`` in eval
    mode; ``ValueError`` for a module that is not a BatchNorm2d with running statistics."""
    if (
        not isinstance(norm, nn.BatchNorm2d)
        or norm.running_var is None
        or norm.running_mean is None
    ):
        raise ValueError("norm must be an nn.BatchNorm2d with running statistics to fold")
    # torch's conv-BN fusion applied to an identity 1x1 "conv" (weight 1, no bias) per channel.
    identity = torch.ones_like(norm.running_mean).unsqueeze(1)
    with torch.no_grad():
        scale, shift = fuse_conv_bn_weights(
            identity,
            None,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
    return scale.detach().squeeze(1), shift.detach()
