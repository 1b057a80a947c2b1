"""The deployed DGConv layer: a grouped convolution between two channel permutations.

Zhang et al., "Differentiable Learning-to-Group Channels via Groupable Convolutional Neural
Networks", ICCV 2019 (the training layer: :class:`dynaconv.layers.dgconv.GroupableConv2d`,
whose ``deploy()`` builds this module when its learned channel order is not the identity).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PermutedGroupConv2d"]


class PermutedGroupConv2d(nn.Module):
    """Deployed DGConv: gather the input channels, a grouped conv, restore the channel order.

    ``forward(x) = conv(x[:, order])[:, inverse]`` with ``inverse = argsort(order)``; exact.
    ``order`` (a buffer) is the only copy of the permutation: ``inverse`` is derived from it at
    each forward (``C`` integers to sort), so a loaded, replaced or edited ``order`` is always
    undone correctly. The gathers cost memory traffic; fold them into neighbouring layers where
    the network allows (:func:`fold_bottleneck`).
    """

    def __init__(self, conv: nn.Conv2d, order: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("order", order.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # State dicts saved before ``inverse`` was derived hold it as a buffer: accept it when
        # it is the inverse of ``order``, refuse it otherwise.
        legacy = state_dict.pop(f"{prefix}inverse", None)
        order = state_dict.get(f"{prefix}order")
        consistent = legacy is None or order is None
        if not consistent and not torch.equal(legacy.cpu(), torch.argsort(order.cpu())):
            raise ValueError(f"{prefix}inverse is not the inverse permutation of {prefix}order")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        inverse = torch.argsort(self.order)
        return self.conv(x.index_select(1, self.order)).index_select(1, inverse)
