"""G-ResNeXt: ResNeXt with every bottleneck 3x3 conv replaced by a DGConv (ICCV 2019).

Zhang et al., "Differentiable Learning-to-Group Channels via Groupable Convolutional Neural
Networks", ICCV 2019. torchvision's ResNeXt-50 32x4d / ResNeXt-101 32x8d where the grouped 3x3
conv of each bottleneck (width 128..1024, resp. 256..2048) becomes a dense-masked
:class:`~dynaconv.layers.GroupableConv2d` that learns its groups: 68,883,377 / 419,627,627
stored parameters, of which 137 / 323 are gates (the sum of ``K = log2(width)`` over blocks).

:meth:`GResNeXt.deploy` turns every DGConv into a real grouped conv and folds its channel
permutation into the bottleneck's ``conv1``/``bn1`` (output channels) and ``bn2``/``conv3``
(input channels), so the deployed network has no gather; it stays a :class:`GResNeXt` (whose
``conv2`` are grouped ``nn.Conv2d``), and deploying it again changes nothing.
"""

from __future__ import annotations

import copy

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from ..layers._base import Deployable
from ..layers.dgconv.layer import GroupableConv2d, Impl
from ..lifecycle import dynaconv_layers
from ._registry import register_model
from .surgery import fold_bottleneck

__all__ = ["GResNeXt", "fold_bottlenecks", "g_resnext50", "g_resnext101"]


def fold_bottlenecks(model: nn.Module) -> nn.Module:
    """Deploy, in place, the DGConv ``conv2`` of every torchvision ``Bottleneck`` in ``model``.

    Each becomes a grouped ``nn.Conv2d`` with its channel permutation folded into the block's
    ``conv1``/``bn1`` and ``bn2``/``conv3`` (no gather; exact). Works on any network made of
    torchvision bottlenecks, e.g. ``dynaconv.convert(resnext50_32x4d(), "dgconv")``; the
    other DGConv layers are left for :func:`dynaconv.deploy`. Returns ``model``.
    """
    for block in model.modules():
        if isinstance(block, Bottleneck) and isinstance(block.conv2, GroupableConv2d):
            block.conv2 = fold_bottleneck(
                block.conv1, block.bn1, block.conv2, block.bn2, block.conv3
            )
    return model


class GResNeXt(Deployable, ResNet):
    """torchvision's ResNet with bottlenecks whose 3x3 conv is a :class:`GroupableConv2d`.

    Args:
        layers: bottlenecks per stage (``[3, 4, 6, 3]`` for 50 layers).
        cardinality, width_per_group: ResNeXt's widths: a stage with ``planes`` has
            ``planes * width_per_group / 64 * cardinality`` channels in its 3x3 conv (a power
            of two). The DGConv is dense: the cardinality only sets the width.
        num_classes: classifier outputs.
        sort, impl: the :class:`GroupableConv2d` options.
    """

    def __init__(
        self,
        layers: list[int],
        cardinality: int = 32,
        width_per_group: int = 4,
        num_classes: int = 1000,
        *,
        sort: bool = False,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(
            Bottleneck,
            layers,
            num_classes=num_classes,
            groups=cardinality,
            width_per_group=width_per_group,
        )
        for block in self.bottlenecks():
            old = block.conv2
            block.conv2 = GroupableConv2d(
                old.in_channels,
                old.out_channels,
                3,
                stride=old.stride,
                padding=old.padding,
                dilation=old.dilation,
                bias=False,
                device=old.weight.device,
                dtype=old.weight.dtype,
                sort=sort,
                impl=impl,
            )
            # The reference initialises every conv kernel like torchvision's ResNet.
            nn.init.kaiming_normal_(block.conv2.dense_weight, mode="fan_out", nonlinearity="relu")

    def bottlenecks(self) -> list[Bottleneck]:
        return [m for m in self.modules() if isinstance(m, Bottleneck)]

    def deploy(self) -> GResNeXt:
        """An eval-mode copy whose DGConvs are grouped convs, permutations folded (exact)."""
        deployed = fold_bottlenecks(copy.deepcopy(self).eval())
        for name, layer in list(dynaconv_layers(deployed)):  # any DGConv outside a bottleneck
            deployed.set_submodule(name, layer.deploy())
        return deployed


@register_model
def g_resnext50(num_classes: int = 1000, *, sort: bool = False, impl: Impl = "auto") -> GResNeXt:
    """G-ResNeXt-50: ResNeXt-50 32x4d widths, DGConv 3x3 convs (68.9M stored parameters)."""
    return GResNeXt([3, 4, 6, 3], 32, 4, num_classes, sort=sort, impl=impl)


@register_model
def g_resnext101(num_classes: int = 1000, *, sort: bool = False, impl: Impl = "auto") -> GResNeXt:
    """G-ResNeXt-101: ResNeXt-101 32x8d widths, DGConv 3x3 convs (419.6M stored parameters)."""
    return GResNeXt([3, 4, 23, 3], 32, 8, num_classes, sort=sort, impl=impl)
