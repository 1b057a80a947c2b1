"""Network surgery: folding a deployed layer's channel permutation into its neighbours.

A deployed DGConv layer (Zhang et al., ICCV 2019) is a grouped convolution on permuted
channels. Inside a bottleneck the permutation need not be computed at all: permuting the
output channels of the conv (and BatchNorm) before it and the input channels of the BatchNorm
(and conv) after it gives exactly the same function with no gather (:func:`fold_bottleneck`;
:func:`dynaconv.models.fold_bottlenecks` applies it to a whole network).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..layers.dgconv.layer import GroupableConv2d

__all__ = ["fold_bottleneck"]


def _permute_output_channels(conv: nn.Conv2d, order: Tensor) -> None:
    if conv.groups != 1:
        raise ValueError("cannot permute the output channels of a grouped conv")
    with torch.no_grad():
        conv.weight.copy_(conv.weight.index_select(0, order))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias.index_select(0, order))


def _permute_input_channels(conv: nn.Conv2d, order: Tensor) -> None:
    if conv.groups != 1:
        raise ValueError("cannot permute the input channels of a grouped conv")
    with torch.no_grad():
        conv.weight.copy_(conv.weight.index_select(1, order))


def _permute_batchnorm(bn: nn.BatchNorm2d, order: Tensor) -> None:
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, order))


def fold_bottleneck(
    producer: nn.Conv2d,
    producer_norm: nn.BatchNorm2d | None,
    layer: GroupableConv2d,
    consumer_norm: nn.BatchNorm2d | None,
    consumer: nn.Conv2d,
) -> nn.Conv2d:
    """Deploy ``layer`` as a grouped conv with its channel permutation folded into neighbours.

    For ``producer -> producer_norm -> (elementwise) -> layer -> consumer_norm ->
    (elementwise) -> consumer`` (a bottleneck's ``conv1, bn1, conv2, bn2, conv3``), the
    producer's output channels and its norm are permuted in place, the consumer's norm and
    input channels likewise, and the grouped conv (on the permuted channels) is returned:
    the chain computes exactly the same function with no gather. The producer and consumer must
    be ungrouped convs and feed nothing else.
    """
    order, conv = layer.grouped_form()
    _permute_output_channels(producer, order)
    if producer_norm is not None:
        _permute_batchnorm(producer_norm, order)
    if consumer_norm is not None:
        _permute_batchnorm(consumer_norm, order)
    _permute_input_channels(consumer, order)
    return conv
