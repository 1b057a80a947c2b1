"""DyResNet-18: ResNet-18 with dynamic group convolutions (DGC, ECCV 2020).

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks".

Both 3x3 convs of every basic block and every 1x1 downsample conv are DGC layers (4 heads,
45% kept by default). As in the paper's code, every DGC layer is preceded by its own
BN-ReLU (held here by the block, not the layer), so a block computes::

    y = bn1(dgc1(relu(bn_in1(x)))) -> relu -> bn2(dgc2(relu(bn_in2(.))))
    shortcut = bn_ds(dgc_ds(relu(bn_in_ds(x)))) when the shape changes, else x
    out = relu(y + shortcut)

The stem (7x7 conv, BN, ReLU, 3x3 max pool) and the head (global pool, linear) are
torchvision's. ``num_classes`` is honoured (the reference code ignores it).
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from ..layers._base import Deployable
from ..layers.dgc.layer import DynamicGroupConv2d, reference_squeeze_rate
from ..spec import check_int
from ._registry import register_model

__all__ = ["DyBasicBlock", "DyResNet", "dyresnet18"]


class PreActDGC(nn.Sequential):
    """BN-ReLU followed by a DGC layer (the unit the reference code calls one layer)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, dgc_options: dict, reference: bool
    ) -> None:
        options = dict(dgc_options)
        if reference:  # the reference's rate and width, a zero width included
            options["squeeze_rate"] = reference_squeeze_rate(cin, options.get("squeeze_rate", 16))
            options["hidden_width"] = cin // options["squeeze_rate"]
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module(
            "conv",
            DynamicGroupConv2d(cin, cout, kernel, stride, kernel // 2, bias=False, **options),
        )


class DyBasicBlock(Deployable, nn.Module):
    """A basic block of DGC layers (module docstring). Deployed (:meth:`deploy`), each DGC
    layer becomes its sparse inference layer with the BatchNorm that follows it folded into
    its kernels and bias (one pass over the output less per layer)."""

    def __init__(
        self, inplanes: int, planes: int, stride: int, dgc_options: dict, reference: bool
    ) -> None:
        super().__init__()
        self.conv1 = PreActDGC(inplanes, planes, 3, stride, dgc_options, reference)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = PreActDGC(planes, planes, 3, 1, dgc_options, reference)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                PreActDGC(inplanes, planes, 1, stride, dgc_options, reference),
                nn.BatchNorm2d(planes),
            )

    def deploy(self) -> DyBasicBlock:
        """A copy for inference: every DGC layer deployed, the BatchNorm after it folded in
        (:meth:`SparseDynamicGroupConv2d.fold_batchnorm`) and replaced by ``nn.Identity``
        where it is an eval-mode BatchNorm with running statistics; any other child
        deployed as :func:`dynaconv.deploy` would."""
        block = copy.deepcopy(self)
        pairs = [(block.conv1, "bn1", block), (block.conv2, "bn2", block)]
        if block.downsample is not None:
            pairs.append((block.downsample[0], "1", block.downsample))
        for unit, norm_name, owner in pairs:
            layer, norm = unit.conv, getattr(owner, norm_name)
            if not isinstance(layer, DynamicGroupConv2d):
                continue
            deployed = layer.deploy()
            if _foldable(norm, deployed.spec.out_channels):
                deployed = deployed.fold_batchnorm(norm)
                setattr(owner, norm_name, nn.Identity())
            unit.conv = deployed
        return _deploy_children(block)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _foldable(norm: nn.Module, channels: int) -> bool:
    return (
        type(norm) is nn.BatchNorm2d
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_features == channels
    )


def _deploy_children(module: nn.Module) -> nn.Module:
    """Every :class:`Deployable` descendant of ``module`` replaced by its ``deploy()``."""
    for name, child in list(module.named_children()):
        if isinstance(child, Deployable):
            setattr(module, name, child.deploy())
        else:
            _deploy_children(child)
    return module


class DyResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 1000,
        *,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.45,
        reference_squeeze: bool = True,
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes")
        options = {"heads": heads, "squeeze_rate": squeeze_rate, "gate_factor": gate_factor}
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for b in range(count):
                stride = 2 if (index > 0 and b == 0) else 1
                blocks.append(DyBasicBlock(inplanes, planes, stride, options, reference_squeeze))
                inplanes = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | DynamicGroupConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def dyresnet18(num_classes: int = 1000, **options) -> DyResNet:
    """DyResNet-18 (4 heads, 45% of the input channels kept)."""
    return DyResNet((2, 2, 2, 2), num_classes, **options)
