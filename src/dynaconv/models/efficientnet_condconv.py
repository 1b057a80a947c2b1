"""EfficientNet-B0 with CondConv (Yang et al., "CondConv", NeurIPS 2019).

The official EfficientNet-CondConv: EfficientNet-B0 (stem 3x3/2 to 32 channels, seven stages of
MBConv blocks, head 1x1 to 1280, average pool, dropout, linear) whose last three stages
(blocks ``i80_o112``, ``i112_o192``, ``i192_o320``) use CondConv for the expand 1x1, the
depthwise kxk and the project 1x1 convs. Each such block has one routing function
(:class:`~dynaconv.layers.condconv.CondConvRouting`) computed on the block input and shared by
its three CondConv layers; squeeze-excite stays static. Stage table (expand ratio, kernel,
stride, in, out, repeats): (1,3,1,32,16,1) (6,3,2,16,24,2) (6,5,2,24,40,2) (6,3,2,40,80,3)
(6,5,1,80,112,3)* (6,5,2,112,192,4)* (6,3,1,192,320,1)*, * = CondConv; the depth variant
multiplies the repeats by 1.1 (rounded up). BatchNorm uses the TF defaults (eps 1e-3,
momentum 0.01); stochastic depth grows linearly with the block index to
``stochastic_depth_prob``.

Two options reproduce other implementations exactly: ``bn_eps`` (timm's native
``efficientnet_cc_*`` models use PyTorch's 1e-5) and ``padding``: ``"symmetric"`` (default,
``k // 2`` on every side, as timm's native models) or ``"same"``: TensorFlow's SAME in the
strided convs (the stem and the first depthwise conv of stages 2, 3, 4 and 6), asymmetric and
computed from the input size, under which the paper's TensorFlow checkpoints (timm's
``tf_efficientnet_cc_*``) were trained; stride-1 convs pad ``k // 2`` either way.
:func:`dynaconv.compat.timm.model_from_timm` picks both from the checkpoint's name.

Published (ImageNet): B0 5.3M params / 391M MACs; CondConv-B0 4 experts 13.3M / 402M; 8 experts
24.0M / 413M; B0-depth 8 experts 39.7M / 614M (MACs include the kernel mixing).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from ..folding import fold_batchnorm
from ..layers._base import Deployable
from ..layers.condconv.layer import CondConv2d, CondConvRouting
from ..padding import SameConv2d
from ..spec import check_int, check_number
from ._registry import register_model

__all__ = [
    "CondConvMBConv",
    "EfficientNetCondConv",
    "efficientnet_b0_condconv4",
    "efficientnet_b0_condconv8",
    "efficientnet_b0_depth_condconv8",
    "efficientnet_condconv",
]


@dataclass(frozen=True)
class _Stage:
    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int
    condconv: bool


_B0_STAGES = (
    _Stage(1, 3, 1, 32, 16, 1, False),
    _Stage(6, 3, 2, 16, 24, 2, False),
    _Stage(6, 5, 2, 24, 40, 2, False),
    _Stage(6, 3, 2, 40, 80, 3, False),
    _Stage(6, 5, 1, 80, 112, 3, True),
    _Stage(6, 5, 2, 112, 192, 4, True),
    _Stage(6, 3, 1, 192, 320, 1, True),
)


PADDINGS = ("symmetric", "same")


def _norm(channels: int, eps: float = 1e-3) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.01)


def _static_conv(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: str = "symmetric"
) -> nn.Conv2d:
    """A plain conv without bias; TensorFlow's SAME (:class:`SameConv2d`) when strided."""
    if padding == "same" and stride > 1:
        return SameConv2d(cin, cout, k, stride, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(self.act(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class CondConvMBConv(Deployable, nn.Module):
    """MBConv block (expand 1x1, depthwise kxk, squeeze-excite, project 1x1, residual).

    With ``num_experts`` the three convs are :class:`CondConv2d` sharing the block's routing
    ``r = routing(x)`` on the block input; with ``num_experts=None`` they are plain convs.
    ``bn_eps`` and ``padding``: see the module docstring. :meth:`deploy` folds each BatchNorm
    into the conv before it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        num_experts: int | None = None,
        se_ratio: float = 0.25,
        stochastic_depth: float = 0.0,
        routing_dropout: float = 0.0,
        impl: str = "auto",
        bn_eps: float = 1e-3,
        padding: str = "symmetric",
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.routing = (
            CondConvRouting(in_channels, num_experts, routing_dropout) if num_experts else None
        )

        def conv(cin: int, cout: int, k: int, s: int = 1, groups: int = 1) -> nn.Module:
            if num_experts:
                return CondConv2d(
                    cin,
                    cout,
                    k,
                    s,
                    "same" if padding == "same" and s > 1 else k // 2,
                    groups=groups,
                    bias=False,
                    num_experts=num_experts,
                    impl=impl,
                    shared_routing=True,
                )
            return _static_conv(cin, cout, k, s, groups, padding)

        self.expand = conv(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.expand_norm = _norm(hidden, bn_eps) if expand_ratio != 1 else None
        self.depthwise = conv(hidden, hidden, kernel, stride, groups=hidden)
        self.depthwise_norm = _norm(hidden, bn_eps)
        self.se = _SqueezeExcite(hidden, max(1, int(in_channels * se_ratio)))
        self.project = conv(hidden, out_channels, 1)
        self.project_norm = _norm(out_channels, bn_eps)
        self.act = nn.SiLU()
        self.residual = stride == 1 and in_channels == out_channels
        self.stochastic_depth = StochasticDepth(stochastic_depth, "row")

    def _conv(self, conv: nn.Module, x: Tensor, r: Tensor | None) -> Tensor:
        return conv(x) if r is None else conv(x, routing_weights=r)

    def forward(self, x: Tensor) -> Tensor:
        r = None if self.routing is None else self.routing(x)
        h = x
        if self.expand is not None:
            h = self.act(self.expand_norm(self._conv(self.expand, h, r)))
        h = self.act(self.depthwise_norm(self._conv(self.depthwise, h, r)))
        h = self.project_norm(self._conv(self.project, self.se(h), r))
        if self.residual:
            h = self.stochastic_depth(h) + x
        return h

    def deploy(self) -> CondConvMBConv:
        """An eval-mode copy with each BatchNorm folded into the conv before it (exact up to
        rounding; the norms become ``nn.Identity``).

        With the norm's eval map ``BN(y) = s * y + t`` (``s = gamma / sqrt(var + eps)``,
        ``t = beta - mean * s``): a plain conv's kernel is scaled by ``s`` per output channel
        and ``t`` becomes its bias; a CondConv's expert kernels (and per-expert biases) are
        scaled by ``s``, which scales every mixed kernel ``sum_e r_e W_e`` by ``s``, and ``t``
        becomes a single unmixed bias (``bias_per_expert=False``; the routing weights need
        not sum to 1, so ``t`` must not be mixed). CondConv layers are then deployed
        (:meth:`CondConv2d.deploy`). One elementwise pass fewer per conv in eager PyTorch, and
        in onnxruntime, which folds a BatchNorm only into a conv with a constant kernel.
        """
        deployed = copy.deepcopy(self).eval()
        pairs = (
            ("expand", "expand_norm"),
            ("depthwise", "depthwise_norm"),
            ("project", "project_norm"),
        )
        with torch.no_grad():
            for conv_name, norm_name in pairs:
                conv = getattr(deployed, conv_name)
                folded = None if conv is None else fold_norm(conv, getattr(deployed, norm_name))
                if folded is not None:
                    setattr(deployed, conv_name, folded)
                    setattr(deployed, norm_name, nn.Identity())
                elif isinstance(conv, CondConv2d):
                    setattr(deployed, conv_name, conv.deploy())
        return deployed


def fold_norm(conv: nn.Module, norm: nn.BatchNorm2d) -> nn.Module | None:
    """``conv`` followed by ``norm`` (eval mode) as one conv, or None where that is not
    possible (a CondConv with per-expert biases: it would need a mixed and an unmixed bias).

    An ``nn.Conv2d`` (or subclass) is scaled in place and given a bias; a :class:`CondConv2d`
    is copied with scaled expert kernels and a single unmixed bias, then deployed (see
    :meth:`CondConvMBConv.deploy`). ValueError for other modules or a norm without running
    statistics.
    """
    scale, shift = fold_batchnorm(norm)
    if isinstance(conv, CondConv2d):
        if conv.bias is not None and conv.bias_per_expert:
            return None
        folded = copy.deepcopy(conv).eval()
        dtype = folded.weight.dtype
        folded.weight.mul_(scale.reshape(1, -1, 1, 1, 1).to(dtype))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        folded.spec = dataclasses.replace(folded.spec, bias=True)
        folded.bias_per_expert = False
        folded.bias = nn.Parameter(bias.to(dtype))
        return folded.deploy()
    if isinstance(conv, nn.Conv2d):
        dtype = conv.weight.dtype
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(dtype))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(dtype))
        return conv
    raise ValueError(f"conv must be an nn.Conv2d or a CondConv2d, got {type(conv).__name__}")


class EfficientNetCondConv(nn.Module):
    """EfficientNet-B0 layout with CondConv blocks in the stages marked for it.

    ``bn_eps`` (BatchNorm epsilon, default TensorFlow's 1e-3) and ``padding``
    (``"symmetric"`` or ``"same"``): see the module docstring.
    """

    def __init__(
        self,
        num_experts: int | None = 8,
        depth_multiplier: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.25,
        stochastic_depth_prob: float = 0.2,
        routing_dropout: float = 0.0,
        impl: str = "auto",
        bn_eps: float = 1e-3,
        padding: str = "symmetric",
    ) -> None:
        super().__init__()
        if num_experts is not None:
            check_int(num_experts, "num_experts", rule="a positive int or None")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not 0 <= stochastic_depth_prob < 1:
            raise ValueError(
                f"stochastic_depth_prob must be in [0, 1), got {stochastic_depth_prob!r}"
            )
        if not depth_multiplier > 0:
            raise ValueError(f"depth_multiplier must be positive, got {depth_multiplier!r}")
        check_number(bn_eps, "bn_eps", lambda eps: eps > 0, "a positive number")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.stem = nn.Sequential(
            _static_conv(3, 32, 3, 2, padding=padding), _norm(32, bn_eps), nn.SiLU(inplace=True)
        )
        repeats = [math.ceil(stage.repeats * depth_multiplier) for stage in _B0_STAGES]
        total = sum(repeats)
        blocks: list[nn.Module] = []
        for stage, count in zip(_B0_STAGES, repeats):
            for i in range(count):
                blocks.append(
                    CondConvMBConv(
                        stage.in_channels if i == 0 else stage.out_channels,
                        stage.out_channels,
                        stage.kernel,
                        stage.stride if i == 0 else 1,
                        stage.expand_ratio,
                        num_experts if stage.condconv else None,
                        stochastic_depth=stochastic_depth_prob * len(blocks) / total,
                        routing_dropout=routing_dropout,
                        impl=impl,
                        bn_eps=bn_eps,
                        padding=padding,
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(320, 1280, 1, bias=False), _norm(1280, bn_eps), nn.SiLU(inplace=True)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)
        self._init_static()

    def _init_static(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and module is self.classifier:
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(self.pool(h).flatten(1)))


#: EfficientNet-B0 (``num_experts=None``: plain) with CondConv in its last three stages, with
#: every option: the function-style name of :class:`EfficientNetCondConv`.
efficientnet_condconv = EfficientNetCondConv


@register_model
def efficientnet_b0_condconv4(**options: Any) -> EfficientNetCondConv:
    """CondConv-EfficientNet-B0, 4 experts (paper: 13.3M params, 402M MACs, 77.8% top-1).

    ``options``: those of :func:`efficientnet_condconv` after the depth (``num_classes``,
    ``dropout``, ``stochastic_depth_prob``, ``routing_dropout``, ``impl``, ``bn_eps``,
    ``padding``).
    """
    return efficientnet_condconv(4, 1.0, **options)


@register_model
def efficientnet_b0_condconv8(**options: Any) -> EfficientNetCondConv:
    """CondConv-EfficientNet-B0, 8 experts (paper: 24.0M params, 413M MACs, 78.3% top-1)."""
    return efficientnet_condconv(8, 1.0, **options)


@register_model
def efficientnet_b0_depth_condconv8(**options: Any) -> EfficientNetCondConv:
    """CondConv-EfficientNet-B0-depth (depth x1.1), 8 experts (paper: 39.7M, 614M, 79.5%).

    timm calls this network ``efficientnet_cc_b1_8e`` / ``tf_efficientnet_cc_b1_8e``: B0's
    width and resolution with B1's depth multiplier.
    """
    return efficientnet_condconv(8, 1.1, **options)
