"""Building blocks shared by the networks: the dense layout of CondenseNet and DyDenseNet.

CondenseNet (:mod:`~dynaconv.models.condensenet`) and DyDenseNet
(:mod:`~dynaconv.models.dydensenet`) share one layout and differ only in the family of the
dense layers' 1x1 conv (a learned group conv, resp. a dynamic group conv) and in their
transitions:

* :func:`dense_features`: a 3x3 stem conv ``3 -> 2 * growth[0]``, then per stage a dense block
  of ``stages[i]`` layers of growth ``growth[i]``, with a transition between blocks; module
  names ``init_conv``, ``denseblock_I.denselayer_J``, ``transition_I`` (the reference code's,
  which its checkpoints use);
* :class:`DenseLayer`: BN-ReLU-1x1 then BN-ReLU-3x3 grouped conv, concatenated to the input;
* :func:`init_dense_weights`: the reference code's initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["DenseLayer", "average_pool_transition", "dense_features", "init_dense_weights"]


class DenseLayer(nn.Module):
    """BN-ReLU-``conv_1`` then BN-ReLU-3x3 grouped conv to ``growth``; returns ``cat([x, new], 1)``.

    ``conv_1`` is the family's 1x1 layer to ``bottleneck * growth`` channels: a learned group
    conv in CondenseNet, a dynamic group conv in DyDenseNet (the same layout otherwise). Input
    ``(N, in_channels, H, W)``, output ``(N, in_channels + growth, H, W)``.
    """

    def __init__(self, in_channels: int, growth: int, conv_1: nn.Module, group_3x3: int) -> None:
        super().__init__()
        width = conv_1.out_channels
        self.norm_1 = nn.BatchNorm2d(in_channels)
        self.relu_1 = nn.ReLU(inplace=True)
        self.conv_1 = conv_1
        self.norm_2 = nn.BatchNorm2d(width)
        self.relu_2 = nn.ReLU(inplace=True)
        self.conv_2 = nn.Conv2d(width, growth, 3, padding=1, groups=group_3x3, bias=False)

    def new_features(self, x: Tensor) -> Tensor:
        hidden = self.conv_1(self.relu_1(self.norm_1(x)))
        return self.conv_2(self.relu_2(self.norm_2(hidden)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.new_features(x)], 1)


def average_pool_transition(channels: int) -> tuple[nn.Module, int]:
    """The plain transition between dense blocks: 2x2 average pooling (channels unchanged)."""
    return nn.AvgPool2d(2, 2), channels


def dense_features(
    stages: Sequence[int],
    growth: Sequence[int],
    stem_stride: int,
    dense_layer: Callable[[int, int], nn.Module],
    transition: Callable[[int], tuple[nn.Module, int]] = average_pool_transition,
) -> tuple[nn.Sequential, int]:
    """The stem and the dense blocks, and the number of channels they output.

    ``dense_layer(in_channels, growth)`` builds one dense layer (its output has ``growth`` more
    channels than its input); ``transition(channels)`` builds what follows every block but
    the last and returns it with its output channels. Modules are built in forward order.
    """
    channels = 2 * growth[0]
    features = nn.Sequential()
    features.add_module(
        "init_conv", nn.Conv2d(3, channels, 3, stride=stem_stride, padding=1, bias=False)
    )
    for i, (layers, rate) in enumerate(zip(stages, growth)):
        block = nn.Sequential()
        for j in range(layers):
            block.add_module(f"denselayer_{j + 1}", dense_layer(channels + j * rate, rate))
        features.add_module(f"denseblock_{i + 1}", block)
        channels += layers * rate
        if i != len(stages) - 1:
            module, channels = transition(channels)
            features.add_module(f"transition_{i + 1}", module)
    return features, channels


def init_dense_weights(
    model: nn.Module,
    kernels: tuple[type[nn.Module], ...] = (nn.Conv2d,),
    self_initialised: tuple[type[nn.Module], ...] = (),
) -> None:
    """The reference code's initialisation of a dense network, in module order.

    ``weight`` of the ``kernels`` modules (shape ``(Cout, Cin / groups, kh, kw)``) ~
    ``normal(0, sqrt(2 / (kh * kw * Cout)))``; ``self_initialised`` modules call their own
    ``reset_parameters()``; BatchNorm weight 1, bias 0; linear biases 0.
    """
    for module in model.modules():
        if isinstance(module, kernels):
            kh, kw = module.kernel_size
            std = math.sqrt(2.0 / (kh * kw * module.out_channels))
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, self_initialised):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
