"""DyDenseNet: CondenseNet's dense layout with dynamic group convolutions (DGC, ECCV 2020).

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks".

Layout (CondenseNet's): a 3x3 stem conv to ``2 * growth[0]`` channels (stride 1 for CIFAR, 2
for ImageNet), dense blocks whose layers are BN-ReLU-DGC 1x1 (``Cin -> bottleneck * growth``)
then BN-ReLU-conv 3x3 (groups ``group_3x3``) to ``growth`` channels, concatenated to the input;
2x2 average pools between blocks; head BN-ReLU-global average pool-linear. Init: conv kernels
``normal(0, sqrt(2 / (k*k*Cout)))``, BN 1/0, classifier bias 0.

The paper's networks use the reference code's squeeze rate, halved for layers with fewer than
80 input channels, and its hidden width ``Cin // squeeze_rate`` even where that is 0
(``reference_squeeze=True``, the default here: it is what the published parameter counts and
checkpoints have; the paper's configurations never reach a zero width).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..layers.dgc.layer import DynamicGroupConv2d, reference_squeeze_rate
from ..spec import check_int
from ._blocks import DenseLayer, dense_features, init_dense_weights
from ._registry import register_model

__all__ = ["DyDenseLayer", "DyDenseNet", "dydensenet74_imagenet", "dydensenet86"]


class DyDenseLayer(DenseLayer):
    """A DyDenseNet dense layer: the 1x1 conv is a :class:`DynamicGroupConv2d`."""

    def __init__(
        self,
        in_channels: int,
        growth: int,
        bottleneck: int,
        group_3x3: int,
        heads: int,
        squeeze_rate: int,
        gate_factor: float,
        hidden_width: int | None = None,
    ) -> None:
        conv_1 = DynamicGroupConv2d(
            in_channels,
            bottleneck * growth,
            1,
            bias=False,
            heads=heads,
            squeeze_rate=squeeze_rate,
            gate_factor=gate_factor,
            hidden_width=hidden_width,
        )
        super().__init__(in_channels, growth, conv_1, group_3x3)


class DyDenseNet(nn.Module):
    """The DyDenseNet family; ``data`` is ``"cifar10"``, ``"cifar100"`` or ``"imagenet"``."""

    def __init__(
        self,
        stages: Sequence[int],
        growth: Sequence[int],
        *,
        num_classes: int = 10,
        data: str = "cifar10",
        bottleneck: int = 4,
        group_3x3: int = 4,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.25,
        reference_squeeze: bool = True,
    ) -> None:
        super().__init__()
        if len(stages) != len(growth) or not stages:
            raise ValueError(
                f"stages and growth must be non-empty and of equal length, got {stages}, {growth}"
            )
        if data not in ("cifar10", "cifar100", "imagenet"):
            raise ValueError(f"data must be 'cifar10', 'cifar100' or 'imagenet', got {data!r}")
        check_int(num_classes, "num_classes")
        stride = 2 if data == "imagenet" else 1

        def dense_layer(in_channels: int, rate: int) -> DyDenseLayer:
            rate_squeeze = (
                reference_squeeze_rate(in_channels, squeeze_rate)
                if reference_squeeze
                else squeeze_rate
            )
            # The reference's own hidden width (Cin // squeeze, possibly 0) in its layout.
            hidden = in_channels // rate_squeeze if reference_squeeze else None
            return DyDenseLayer(
                in_channels, rate, bottleneck, group_3x3, heads, rate_squeeze, gate_factor, hidden
            )

        self.features, channels = dense_features(stages, growth, stride, dense_layer)
        self.norm_last = nn.BatchNorm2d(channels)
        self.relu_last = nn.ReLU(inplace=True)
        self.pool_last = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's initialisation; the DGC kernels like the convs' (its gates keep
        their own)."""
        init_dense_weights(self, kernels=(nn.Conv2d, DynamicGroupConv2d))

    def forward(self, x: Tensor) -> Tensor:
        features = self.relu_last(self.norm_last(self.features(x)))
        return self.classifier(self.pool_last(features).flatten(1))


@register_model
def dydensenet86(num_classes: int = 10, **options) -> DyDenseNet:
    """DyDenseNet-86 for CIFAR: stages 14-14-14, growth 8-16-32, 4 heads, 25% kept."""
    data = options.pop("data", "cifar10" if num_classes == 10 else "cifar100")
    return DyDenseNet([14, 14, 14], [8, 16, 32], num_classes=num_classes, data=data, **options)


@register_model
def dydensenet74_imagenet(num_classes: int = 1000, **options) -> DyDenseNet:
    """DyDenseNet for ImageNet (CondenseNet-74 layout: stages 4-6-8-10-8, growth 8-...-128)."""
    return DyDenseNet(
        [4, 6, 8, 10, 8],
        [8, 16, 32, 64, 128],
        num_classes=num_classes,
        data="imagenet",
        **options,
    )
