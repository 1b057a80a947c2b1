"""CondenseNet and CondenseNet-light (Huang et al., CVPR 2018), built from learned group convs.

Training form (:class:`CondenseNet`):

* stem: 3x3 conv ``3 -> 2 * growth[0]`` (stride 1 on CIFAR, 2 on ImageNet);
* dense blocks of :class:`CondenseLayer`: BN-ReLU-LGC 1x1 (``Cin -> bottleneck * k``,
  ``group_1x1`` learned groups, condensation factor ``condense_factor``) then BN-ReLU-3x3 conv
  (``groups = group_3x3``) to ``k`` channels, concatenated to the input;
* transitions: 2x2 average pooling (CondenseNet) or, with ``compression``, BN-ReLU-LGC 1x1 to
  ``compression * C`` channels then 2x2 average pooling (CondenseNet-light, the reference's
  ``densenet_LGC``);
* head: BN-ReLU, average pooling (8 on CIFAR, 7 on ImageNet), linear.

Init as the reference: conv weights normal(0, sqrt(2 / (kh * kw * Cout))), BN 1 / 0, linear
bias 0. ``dynaconv.set_progress(model, p)`` condenses; ``dynaconv.aux_loss(model)`` is the
group lasso.

Deployed form (:meth:`CondenseNet.deploy`, :func:`deploy_condensenet`): every LGC becomes the
exact index layer (:class:`~dynaconv.layers.lgc.CondensedGroupConv2d`) with the BN-ReLU
before it folded in (on the gathered channels) and the BN-ReLU after it (the 3x3 conv's)
folded into its epilogue; on CUDA this is one Triton kernel. The channel shuffle that undoes
the interleaved groups is removed by permuting the 3x3 conv's input channels when that
permutation stays inside the 3x3 conv's groups (``group_3x3 = 1``), else it is done by the
kernel's output addressing (free) or by a reshape on the PyTorch path. Dense blocks write
every layer's new features into one preallocated buffer instead of concatenating (the
growing ``torch.cat`` copies are gone; layers read a channel prefix of the buffer in place).
On the CPU each dense layer runs its folded form
(:class:`~dynaconv.layers.lgc.deployed.FoldedPointwise`: both BatchNorms in the 1x1 kernel and
bias, one gather, one clamp, one matrix product, one ReLU pass writing the shuffled order, then
the 3x3 conv, whose kernel is padded with zero rows to :data:`GROUP_ROWS_MIN` outputs per
group where it has fewer: oneDNN runs the padded grouped conv faster); traced or exported,
the block concatenates instead (graphs have no in-place writes), so an ONNX or ExecuTorch
graph holds per layer a Gather, a Max, two Convs, the shuffle where it is kept (a channel
Gather in ONNX, a Transpose otherwise), and a Concat. In an ONNX export the grouped 3x3 conv
is written in a form that onnxruntime runs in its blocked (NCHWc) kernels where that is
estimated cheaper (:func:`blocked_group_conv`: a block-diagonal dense conv, the grouped conv
with its channels per group padded by zero kernels, or a depthwise conv and a 1x1 conv), the
shuffle folded into the form's Gather or dense kernel; plain ONNX ops, the same results up to
rounding.
``prune_classifier=True`` reproduces the reference's lossy conversion, which keeps the half
of the classifier's input features with the largest column L1 norm.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..dispatch import _in_onnx_export, tracing
from ..layers._base import Deployable
from ..layers.lgc.deployed import (
    FoldedPointwise,
    fold_pointwise,
    folded_pointwise,
    interleave_source,
)
from ..layers.lgc.layer import (
    CondensedGroupConv2d,
    GatherWorkspace,
    LearnedGroupConv2d,
    fold_batchnorm,
)
from ._blocks import DenseLayer, average_pool_transition, dense_features, init_dense_weights
from ._registry import register_model

__all__ = [
    "CondenseLayer",
    "CondenseNet",
    "CondensedDenseBlock",
    "CondensedDenseLayer",
    "DenseLayer",
    "PrunedLinear",
    "condensenet50",
    "condensenet74",
    "condensenet74_imagenet_g4",
    "condensenet74_imagenet_g8",
    "condensenet86",
    "condensenet98",
    "condensenet110",
    "condensenet122",
    "condensenet182",
    "condensenet_light",
    "deploy_condensenet",
]

Data = Literal["cifar", "imagenet"]
Impl = Literal["auto", "torch", "triton"]


class CondenseLayer(DenseLayer):
    """A CondenseNet dense layer: the 1x1 conv is a :class:`LearnedGroupConv2d`."""

    def __init__(
        self,
        in_channels: int,
        growth: int,
        *,
        bottleneck: int = 4,
        group_1x1: int = 4,
        group_3x3: int = 4,
        condense_factor: int | None = None,
        dropout: float = 0.0,
        reference_lasso: bool = False,
    ) -> None:
        conv_1 = LearnedGroupConv2d(
            in_channels,
            bottleneck * growth,
            1,
            bias=False,
            learned_groups=group_1x1,
            condense_factor=condense_factor,
            dropout=dropout,
            reference_lasso=reference_lasso,
        )
        super().__init__(in_channels, growth, conv_1, group_3x3)


class LGCTransition(nn.Module):
    """CondenseNet-light's transition: BN-ReLU-LGC 1x1 (compression) then 2x2 average pooling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        group_1x1: int = 4,
        condense_factor: int | None = None,
        reference_lasso: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = LearnedGroupConv2d(
            in_channels,
            out_channels,
            1,
            bias=False,
            learned_groups=group_1x1,
            condense_factor=condense_factor,
            reference_lasso=reference_lasso,
        )
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.norm(x))))


def _make_divisible(value: int, divisor: int) -> int:
    return value if value % divisor == 0 else (value // divisor + 1) * divisor


class CondenseNet(Deployable, nn.Module):
    """CondenseNet (``compression=None``) or CondenseNet-light (``compression`` given).

    Args:
        stages: dense layers per block. growth: growth rate per block.
        num_classes: classifier outputs. data: ``"cifar"`` (stem stride 1, final pool 8) or
            ``"imagenet"`` (stride 2, pool 7).
        bottleneck: width of the 1x1 LGC in units of the growth rate.
        group_1x1: learned groups ``G`` of every LGC. group_3x3: groups of the 3x3 convs.
        condense_factor: ``C`` (default ``group_1x1``). dropout: on the LGC inputs.
        compression: ``None`` for pooling-only transitions; a fraction (0.5 in the paper) for
            LGC transitions (CondenseNet-light), rounded up to a multiple of ``group_1x1``.
        reference_lasso: every LGC computes the reference's group lasso verbatim, which stops
            at stage ``group_1x1 - 1`` instead of ``condense_factor - 1`` (they differ only
            when ``condense_factor != group_1x1``; see :mod:`dynaconv.layers.lgc`). The
            networks :mod:`dynaconv.compat` builds from reference checkpoints set it.
    """

    def __init__(
        self,
        stages: Sequence[int],
        growth: Sequence[int],
        *,
        num_classes: int = 10,
        data: Data = "cifar",
        bottleneck: int = 4,
        group_1x1: int = 4,
        group_3x3: int = 4,
        condense_factor: int | None = None,
        dropout: float = 0.0,
        compression: float | None = None,
        reference_lasso: bool = False,
    ) -> None:
        super().__init__()
        stages, growth = list(stages), list(growth)
        if not stages or len(stages) != len(growth):
            raise ValueError(
                f"stages and growth must be non-empty and of equal length, got {stages}, {growth}"
            )
        if any(not isinstance(v, int) or v <= 0 for v in stages + growth):
            raise ValueError(f"stages and growth must be positive ints, got {stages}, {growth}")
        if data not in ("cifar", "imagenet"):
            raise ValueError(f"data must be 'cifar' or 'imagenet', got {data!r}")
        if compression is not None and not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1] or None, got {compression!r}")
        self.config = {
            "stages": stages,
            "growth": growth,
            "num_classes": num_classes,
            "data": data,
            "bottleneck": bottleneck,
            "group_1x1": group_1x1,
            "group_3x3": group_3x3,
            "condense_factor": condense_factor,
            "dropout": dropout,
            "compression": compression,
            "reference_lasso": reference_lasso,
        }
        stride, pool = (1, 8) if data == "cifar" else (2, 7)

        def dense_layer(in_channels: int, rate: int) -> CondenseLayer:
            return CondenseLayer(
                in_channels,
                rate,
                bottleneck=bottleneck,
                group_1x1=group_1x1,
                group_3x3=group_3x3,
                condense_factor=condense_factor,
                dropout=dropout,
                reference_lasso=reference_lasso,
            )

        def lgc_transition(channels: int) -> tuple[nn.Module, int]:
            out = _make_divisible(math.ceil(channels * compression), group_1x1)
            lgc = LGCTransition(
                channels,
                out,
                group_1x1=group_1x1,
                condense_factor=condense_factor,
                reference_lasso=reference_lasso,
            )
            return lgc, out

        self.features, channels = dense_features(
            stages,
            growth,
            stride,
            dense_layer,
            average_pool_transition if compression is None else lgc_transition,
        )
        self.features.add_module("norm_last", nn.BatchNorm2d(channels))
        self.features.add_module("relu_last", nn.ReLU(inplace=True))
        self.features.add_module("pool_last", nn.AvgPool2d(pool))
        self.classifier = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation (:func:`~dynaconv.models._blocks.init_dense_weights`;
        every LGC resets itself)."""
        init_dense_weights(self, self_initialised=(LearnedGroupConv2d,))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))

    def deploy(self, *, prune_classifier: bool = False, impl: Impl = "auto") -> nn.Module:
        """The fast exact inference network (see the module docstring)."""
        return deploy_condensenet(self, prune_classifier=prune_classifier, impl=impl)


# ------------------------------------------------------------------------------------------
# deployed form


class CondensedDenseLayer(nn.Module):
    """A deployed :class:`CondenseLayer`: fused index layer (BN-ReLU around it) and the 3x3 conv.

    ``forward`` returns only the new features (the block places them in its buffer). On the
    CPU the block runs the index layer's :class:`~dynaconv.layers.lgc.FoldedPointwise` form
    (:meth:`folded`): every BatchNorm in its kernel and bias, one gather, one clamp, one matrix
    product, the ReLU writing the 3x3 conv's input order.
    """

    def __init__(self, conv_1: CondensedGroupConv2d, conv_2: nn.Conv2d) -> None:
        super().__init__()
        self.conv_1 = conv_1
        self.conv_2 = conv_2
        self._pointwise = conv_1._pointwise()  # its geometry is fixed
        self._folded: FoldedPointwise | None = None
        self._blocked: BlockedGroupConv | None = None
        self._folded_key: tuple[Any, ...] | None = None
        self.refresh()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    def refresh(self) -> None:
        """Re-derive the folded form (:meth:`folded`) from the index layer's tensors.

        Its tensors are kept as non-persistent buffers, so that traced graphs see them as the
        module's state (``torch.export`` lifts them as buffers; a backend such as XNNPACK
        takes a conv only with a static kernel), not in the state dict."""
        if not self._pointwise:
            return
        folded = fold_pointwise(self.conv_1)
        self.register_buffer(
            "_padded_conv_2", padded_group_kernel(self.conv_2, GROUP_ROWS_MIN), persistent=False
        )
        blocked = blocked_group_conv(self.conv_2)
        if blocked is not None and folded.interleave:  # the shuffle goes into the form's index
            blocked = blocked.reading(interleave_source(folded))
        # A plain attribute, not buffers: only an ONNX export reads it (as constants); buffers
        # would also go, unused, into every other exported program (ExecuTorch's).
        self._blocked = blocked
        for field, value in zip(FoldedPointwise._fields, folded):
            if isinstance(value, Tensor) or value is None:
                self.register_buffer(f"_folded_{field}", value, persistent=False)
        self._folded = folded._replace(
            **{
                field: getattr(self, f"_folded_{field}")
                for field, value in zip(FoldedPointwise._fields, folded)
                if isinstance(value, Tensor)
            }
        )
        self._folded_key = self._folded_source()

    def _apply(self, fn: Any, recurse: bool = True) -> CondensedDenseLayer:
        super()._apply(fn, recurse)  # moved or cast: derive the folded form anew
        self.refresh()
        return self

    @classmethod
    def from_layer(
        cls, layer: CondenseLayer, *, impl: Impl = "auto", fold_shuffle: bool = True
    ) -> CondensedDenseLayer:
        conv_1 = CondensedGroupConv2d.from_learned(
            layer.conv_1, pre_norm=layer.norm_1, pre_relu=True, impl=impl
        )
        scale, shift = fold_batchnorm(layer.norm_2)
        channel_at = _interleaved_channel_at(conv_1)
        conv_2 = permute_conv_inputs(layer.conv_2, channel_at) if fold_shuffle else None
        if conv_2 is None:  # the shuffle would cross the 3x3 conv's groups: keep it
            conv_1.set_output_post(scale, shift, True, interleave=True)
            conv_2 = copy.deepcopy(layer.conv_2)
        else:
            conv_1.set_output_post(scale[channel_at], shift[channel_at], True, interleave=False)
        conv_2.requires_grad_(False)
        conv_1.channels_last_output = conv_2.groups > 1
        return cls(conv_1, conv_2)

    def foldable(self) -> bool:
        """Whether the block may run this layer as its folded form: a 1x1, stride-1, unpadded
        index layer not forced onto the Triton kernel, and no forward hooks on the layer or its
        convs (the folded form calls neither, so hooks, e.g. :func:`dynaconv.profile`'s, would
        not see them)."""
        conv_1, conv_2 = self._modules["conv_1"], self._modules["conv_2"]
        return (
            self._pointwise
            and conv_1.impl != "triton"
            and not (self._forward_hooks or self._forward_pre_hooks)
            and not (conv_1._forward_hooks or conv_1._forward_pre_hooks)
            and not (conv_2._forward_hooks or conv_2._forward_pre_hooks)
        )

    def folded(self) -> FoldedPointwise:
        """The index layer's folded form, derived when the layer is built, loaded, moved or
        cast, and by eager forwards whenever one of its tensors was replaced or written in
        place (see :meth:`CondensedGroupConv2d.refresh`). Traced graphs use it as last derived:
        after an edit through ``.data`` call :meth:`refresh`."""
        if self._folded is None or (not tracing() and self._stale()):
            self.refresh()
        return self._folded

    def _eager_folded(self) -> FoldedPointwise:
        # folded() for a caller that knows it runs eagerly (one check fewer per layer)
        if self._stale():
            self.refresh()
        return self._folded  # type: ignore[return-value]

    def _folded_source(self) -> tuple[Any, ...]:
        # The flags and every tensor the form comes from, with its in-place version
        # (the tensors themselves: replacing one, as loading or ``functional_call`` may, shows
        # as another object).
        conv = self._modules["conv_1"]
        tensors = (
            conv._buffers["index"],
            *conv._parameters.values(),
            *self._modules["conv_2"]._parameters.values(),
        )
        flags = (conv.in_relu, conv.out_relu, conv.interleave)
        return flags, tuple((t, None if t is None else t._version) for t in tensors)

    def _stale(self) -> bool:
        """Whether a tensor the folded form comes from was replaced or written in place since
        it was derived (runs on every eager forward: read from the module's own dicts)."""
        if self._folded_key is None:
            return True
        flags, sources = self._folded_key
        conv = self._modules["conv_1"]
        if flags != (conv.in_relu, conv.out_relu, conv.interleave):
            return True
        current = (
            conv._buffers["index"],
            *conv._parameters.values(),
            *self._modules["conv_2"]._parameters.values(),
        )
        if len(current) != len(sources):
            return True
        for tensor, (source, version) in zip(current, sources):
            if tensor is not source or (tensor is not None and tensor._version != version):
                return True
        return False

    def _new_features_into(self, hidden: Tensor, target: Tensor) -> None:
        """Eager: write ``conv_2(hidden)`` into ``target`` (a channel slice of the block's
        buffer), through the zero-padded kernel where there is one (:func:`padded_group_kernel`:
        the padded conv computes the real rows as the grouped conv does, its extra rows are
        dropped by the write)."""
        conv, padded = self._modules["conv_2"], self._buffers["_padded_conv_2"]
        if padded is None:
            target.copy_(conv._conv_forward(hidden, conv.weight, conv.bias))
            return
        y = F.conv2d(hidden, padded, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        batch, _, height, width = y.shape
        groups = conv.groups
        real = target.view(batch, groups, -1, height, width)
        real.copy_(y.view(batch, groups, -1, height, width).narrow(2, 0, real.shape[2]))

    def _blocked_new_features(self, features: Tensor) -> Tensor:
        """Traced for ONNX: the new features through the 3x3 conv's blocked form
        (:func:`blocked_group_conv`) where it has one, the channel shuffle folded into the
        form's input Gather."""
        folded = self.folded()  # derives the blocked form too
        if self._blocked is None:
            return self.conv_2(folded_pointwise(folded, features, traced=True))
        rows = folded_pointwise(folded, features, traced=True, rows_only=True)
        return blocked_group_conv_forward(self._blocked, self.conv_2, rows)

    def forward(self, x: Tensor, *, prefix: bool = False) -> Tensor:
        """New features from ``x`` (with ``prefix``: from the first input channels of ``x``)."""
        return self.conv_2(self.conv_1(x, prefix=prefix))


class CondensedDenseBlock(nn.Module):
    """Deployed dense block: new features written into one preallocated buffer.

    On the CPU (eager or traced) each layer runs as ``conv_2(folded_pointwise(features))``
    (:meth:`CondensedDenseLayer.folded`): per layer a gather, a clamp, one matrix product and a
    ReLU, then the 3x3 conv (eager: on its padded kernel, :func:`padded_group_kernel`, where
    it has one); eager, the new features go into a buffer allocated once per block (the
    layers gather from it in place), traced, into a concatenation (ONNX has no in-place
    writes; in an ONNX export the 3x3 convs in their blocked forms, :func:`blocked_group_conv`).
    Elsewhere the layers run their own forward (on CUDA: the fused Triton kernel).
    """

    def __init__(self, in_channels: int, layers: Sequence[CondensedDenseLayer]) -> None:
        super().__init__()
        self.in_channels = in_channels
        for j, layer in enumerate(layers):
            self.add_module(f"denselayer_{j + 1}", layer)
        self.out_channels = in_channels + sum(
            layer.conv_2.out_channels for layer in self.children()
        )
        self.workspace = GatherWorkspace()

    def forward(self, x: Tensor) -> Tensor:
        layers = self._modules.values()
        if (
            x.device.type == "cpu"
            and not (_global_forward_hooks or _global_forward_pre_hooks)
            and all(layer.foldable() for layer in layers)
        ):
            if not tracing():
                return self._forward_folded(x)
            return self._forward_traced(x, blocked=_in_onnx_export())
        batch, channels, height, width = x.shape
        out = x.new_empty(batch, self.out_channels, height, width)
        out[:, :channels] = x
        for layer in self.children():
            new = layer(out, prefix=True)
            out[:, channels : channels + new.shape[1]] = new
            channels += new.shape[1]
        return out

    def _forward_folded(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        out = x.new_empty(batch, self.out_channels, height, width)
        out.narrow(1, 0, channels).copy_(x)
        workspace = self.workspace
        for layer in self._modules.values():
            hidden = folded_pointwise(layer._eager_folded(), out, workspace, traced=False)
            new_channels = layer._modules["conv_2"].out_channels
            layer._new_features_into(hidden, out.narrow(1, channels, new_channels))
            channels += new_channels
        return out

    def _forward_traced(self, x: Tensor, *, blocked: bool = False) -> Tensor:
        """The graph form; ``blocked`` (an ONNX export): the 3x3 convs in their blocked forms
        (:func:`blocked_group_conv`)."""
        features = x
        for layer in self._modules.values():
            if blocked:
                new = layer._blocked_new_features(features)
            else:
                new = layer.conv_2(folded_pointwise(layer.folded(), features, traced=True))
            features = torch.cat([features, new], 1)
        return features


class PrunedLinear(nn.Module):
    """``linear(x[:, index])``: the reference's classifier pruning (``index`` buffer)."""

    def __init__(self, index: Tensor, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("index", index.detach().to(torch.long).clone())
        self.linear = linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: float = 0.5) -> PrunedLinear:
        """Keep the ``int(keep * in_features)`` inputs of largest column L1 norm (lossy)."""
        kept = int(linear.in_features * keep)
        importance = linear.weight.detach().abs().sum(0)
        index = torch.sort(importance, stable=True).indices[linear.in_features - kept :]
        pruned = nn.Linear(
            kept,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            pruned.weight.copy_(linear.weight[:, index])
            if linear.bias is not None:
                pruned.bias.copy_(linear.bias)
        return cls(index, pruned.requires_grad_(False))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.index_select(1, self.index))


class CondensedCondenseNet(nn.Module):
    """The deployed network: ``classifier(features(x).flatten(1))``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _interleaved_channel_at(conv: CondensedGroupConv2d) -> Tensor:
    """For each group-major output position ``g * N + n``, its interleaved channel ``n * G + g``."""
    cout, groups = conv.out_channels, conv.learned_groups
    positions = torch.arange(cout, device=conv.index.device)
    per_group = cout // groups
    return (positions % per_group) * groups + positions // per_group


#: On the CPU, a dense layer's grouped 3x3 conv with fewer outputs per group than this runs
#: with its kernel padded by zero rows to this many per group (CondenseNet-86's first block:
#: 2 outputs per group, where oneDNN's grouped conv is 1.5-1.9x slower than the padded one at
#: batch 1 and 16; ``benchmarks/NOTES.md``).
GROUP_ROWS_MIN = 4


def padded_group_kernel(conv: nn.Conv2d, rows: int) -> Tensor | None:
    """``conv``'s kernel with each group's output rows padded by zero kernels to ``rows``
    ``(groups * rows, Cin / groups, kh, kw)``, or ``None`` unless it is a grouped conv with
    fewer rows per group, no bias and zero padding (CondenseNet's 3x3 convs). Row
    ``g * rows + n`` (``n`` below the group's ``Cout / groups`` rows) is the kernel's row
    ``g * Cout / groups + n``; the padded rows compute zeros, which the caller drops."""
    per_group = conv.out_channels // conv.groups
    if (
        conv.groups == 1
        or per_group >= rows
        or conv.bias is not None
        or conv.padding_mode != "zeros"
    ):
        return None
    weight = conv.weight.detach().view(conv.groups, per_group, -1)
    padded = F.pad(weight, (0, 0, 0, rows - per_group))
    return padded.reshape(conv.groups * rows, *conv.weight.shape[1:]).contiguous()


#: The channel block of onnxruntime's blocked (NCHWc) conv kernels on AVX-512 (8 on AVX2:
#: a multiple of 16 is a multiple of 8). onnxruntime runs a grouped conv in them only when its
#: input and output channels per group are multiples of the block (or it is depthwise);
#: other grouped convs take its generic path (im2col and a GEMM per group).
ONNX_CHANNEL_BLOCK = 16

#: Cost per multiply-add in onnxruntime (one thread, CondenseNet-86's 3x3 conv shapes at batch
#: 1, ``benchmarks/NOTES.md``), relative to the blocked kernels' dense convs (28-41 GMAC/s):
#: the blocked depthwise conv ran 12.5 GMAC/s, the generic grouped path 6-10 GMAC/s.
BLOCKED_DEPTHWISE_COST = 3.0
GENERIC_GROUPED_COST = 5.0


class BlockedGroupConv(NamedTuple):
    """A grouped conv as ops onnxruntime runs in its blocked kernels (:func:`blocked_group_conv`):
    ``y = conv(x[:, index], weight, groups)``, then ``conv1x1(y, pointwise)`` if any, then
    ``y[:, keep]`` if any (``index`` None: all channels in order).

    ``kind``: ``"dense"`` (one ungrouped conv with the block-diagonal kernel), ``"padded"``
    (the grouped conv with zero kernels padding its channels per group to the block; ``keep``
    drops the padded outputs) or ``"depthwise"`` (every (output, input) pair of a group as one
    depthwise channel, ``index`` repeating the inputs, then a 1x1 conv of ones summing each
    output's channels)."""

    kind: str
    index: Tensor | None
    weight: Tensor
    pointwise: Tensor | None
    keep: Tensor | None

    def reading(self, source: Tensor) -> BlockedGroupConv:
        """The form on ``x`` whose channel ``j`` is the original input's channel ``source[j]``
        is given ``x`` itself (``x[:, source]`` is the original input): the dense form takes the
        gather into its kernel's columns (no Gather), the others into their ``index``."""
        index = source if self.index is None else source[self.index]
        if self.kind != "dense":
            return self._replace(index=index)
        weight = self.weight.new_zeros(self.weight.shape[0], source.numel(), *self.weight.shape[2:])
        weight.index_add_(1, index, self.weight)  # duplicates (padding) carry zero columns
        return self._replace(index=None, weight=weight)


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


BlockedKind = Literal["dense", "padded", "depthwise"]


def blocked_group_conv(
    conv: nn.Conv2d, block: int = ONNX_CHANNEL_BLOCK, *, kind: BlockedKind | None = None
) -> BlockedGroupConv | None:
    """``conv`` (grouped, no bias, zero padding) as the cheapest of three forms that run in
    onnxruntime's blocked kernels (:class:`BlockedGroupConv`), or ``None`` when its channels
    per group are already multiples of ``block``, it is depthwise, not grouped or biased, or
    the generic grouped conv is estimated cheaper. Costs per output pixel, ``k`` kernel taps,
    channels rounded up to ``block`` (``up``): dense ``up(Cin) up(Cout) k``, padded
    ``G up(Cin/G) up(Cout/G) k``, depthwise ``3 up(T) k + up(T) up(Cout)`` with
    ``T = Cout Cin/G``, against the grouped conv's ``5 Cout (Cin/G) k``
    (:data:`BLOCKED_DEPTHWISE_COST`, :data:`GENERIC_GROUPED_COST`). Exact up to rounding:
    every form sums the same products (the depthwise form in another order). The costs are
    x86 onnxruntime's (AVX2 and AVX-512 have blocked kernels); a runtime without blocked
    kernels runs the forms' extra MACs in its generic convs. ``kind``: that
    form whatever the costs (still ``None`` for a conv outside the forms' reach)."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if kind not in (None, "dense", "padded", "depthwise"):
        raise ValueError(f"kind must be 'dense', 'padded', 'depthwise' or None, got {kind!r}")
    groups = conv.groups
    cin, cout = conv.in_channels, conv.out_channels
    per_in, per_out = cin // groups, cout // groups
    if (
        groups == 1
        or (per_in == 1 and per_out == 1)
        or conv.bias is not None
        or conv.padding_mode != "zeros"
        or (per_in % block == 0 and per_out % block == 0)
    ):
        return None
    taps = math.prod(conv.kernel_size)
    pairs = cout * per_in  # the depthwise form's channels
    up = _round_up
    costs = {
        "dense": up(cin, block) * up(cout, block) * taps,
        "padded": groups * up(per_in, block) * up(per_out, block) * taps,
        "depthwise": BLOCKED_DEPTHWISE_COST * up(pairs, block) * taps
        + up(pairs, block) * up(cout, block),
    }
    if kind is None:
        kind = min(costs, key=costs.__getitem__)  # ties: the first (fewest ops)
        if costs[kind] >= GENERIC_GROUPED_COST * cout * per_in * taps:
            return None
    weight = conv.weight.detach()
    device = weight.device
    group_of_row = torch.arange(cout, device=device) // per_out
    if kind == "dense":
        full = up(cin, block)
        dense = weight.new_zeros(cout, full, *weight.shape[2:])
        columns = group_of_row[:, None] * per_in + torch.arange(per_in, device=device)
        dense.scatter_(1, columns[:, :, None, None].expand_as(weight), weight)
        index = None
        if full != cin:  # padding channels repeat channel 0 (zero kernels)
            index = torch.cat([torch.arange(cin, device=device), index_zeros(full - cin, device)])
        return BlockedGroupConv(kind, index, dense.contiguous(), None, None)
    if kind == "padded":
        in_p, out_p = up(per_in, block), up(per_out, block)
        padded = weight.new_zeros(groups, out_p, in_p, *weight.shape[2:])
        padded[:, :per_out, :per_in] = weight.view(groups, per_out, per_in, *weight.shape[2:])
        index = keep = None
        if in_p != per_in:
            local = torch.arange(in_p, device=device).clamp(max=per_in - 1)
            index = (torch.arange(groups, device=device)[:, None] * per_in + local).reshape(-1)
        if out_p != per_out:
            rows = torch.arange(per_out, device=device)
            keep = (torch.arange(groups, device=device)[:, None] * out_p + rows).reshape(-1)
        kernel = padded.reshape(groups * out_p, in_p, *weight.shape[2:]).contiguous()
        return BlockedGroupConv(kind, index, kernel, None, keep)
    full = up(pairs, block)
    local = torch.arange(per_in, device=device)
    index = (group_of_row[:, None] * per_in + local).reshape(-1)  # pair o * (Cin/G) + c
    depthwise = weight.new_zeros(full, 1, *weight.shape[2:])
    depthwise[:pairs, 0] = weight.reshape(pairs, *weight.shape[2:])
    pointwise = weight.new_zeros(cout, full, 1, 1)
    pointwise[torch.arange(pairs, device=device) // per_in, torch.arange(pairs, device=device)] = 1
    if full != pairs:
        index = torch.cat([index, index_zeros(full - pairs, device)])
    return BlockedGroupConv(kind, index, depthwise.contiguous(), pointwise.contiguous(), None)


def index_zeros(count: int, device: torch.device) -> Tensor:
    return torch.zeros(count, dtype=torch.long, device=device)


def blocked_group_conv_forward(form: BlockedGroupConv, conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` through ``form`` (:func:`blocked_group_conv` of ``conv``)."""
    if form.index is not None:
        x = x.index_select(1, form.index)
    groups = {"dense": 1, "padded": conv.groups, "depthwise": form.weight.shape[0]}[form.kind]
    y = F.conv2d(x, form.weight, None, conv.stride, conv.padding, conv.dilation, groups)
    if form.pointwise is not None:
        y = F.conv2d(y, form.pointwise)
    if form.keep is not None:
        y = y.index_select(1, form.keep)
    return y


def permute_conv_inputs(conv: nn.Conv2d, channel_at: Tensor) -> nn.Conv2d | None:
    """A copy of ``conv`` reading input channel ``channel_at[p]`` at position ``p``.

    ``None`` when the permutation moves a channel into another of the conv's groups (a grouped
    conv cannot then absorb it).
    """
    per_group = conv.in_channels // conv.groups
    positions = torch.arange(conv.in_channels, device=channel_at.device)
    if not bool((channel_at // per_group == positions // per_group).all()):
        return None
    local = (channel_at - (positions // per_group) * per_group).view(conv.groups, per_group)
    rows_per_group = conv.out_channels // conv.groups
    rows = local.repeat_interleave(rows_per_group, dim=0).to(conv.weight.device)
    permuted = copy.deepcopy(conv)
    with torch.no_grad():
        index = rows[:, :, None, None].expand_as(conv.weight)
        permuted.weight.copy_(conv.weight.gather(1, index))
    return permuted


def _deploy_transition(module: nn.Module, impl: Impl) -> nn.Module:
    if isinstance(module, LGCTransition):
        conv = CondensedGroupConv2d.from_learned(
            module.conv, pre_norm=module.norm, pre_relu=True, impl=impl
        )
        return nn.Sequential(OrderedDict(conv=conv, pool=copy.deepcopy(module.pool)))
    return copy.deepcopy(module)


def deploy_condensenet(
    model: CondenseNet,
    *,
    prune_classifier: bool = False,
    impl: Impl = "auto",
    fold_shuffle: bool = True,
) -> CondensedCondenseNet:
    """The deployed network (exact unless ``prune_classifier``; see the module docstring).

    ``impl`` selects the index layers' path (``"auto"``: the fused Triton kernel on CUDA);
    ``fold_shuffle=False`` keeps the interleaved output order everywhere (the reference's
    converted layout). Works at any condensation stage (each group gathers the inputs it still
    reads).
    """
    if not isinstance(model, CondenseNet):
        raise TypeError(f"deploy_condensenet expects a CondenseNet, got {type(model).__name__}")
    features = nn.Sequential()
    for name, module in model.features.named_children():
        if name.startswith("denseblock_"):
            layers = [
                CondensedDenseLayer.from_layer(layer, impl=impl, fold_shuffle=fold_shuffle)
                for layer in module
            ]
            features.add_module(name, CondensedDenseBlock(module[0].norm_1.num_features, layers))
        elif name.startswith("transition_"):
            features.add_module(name, _deploy_transition(module, impl))
        else:
            features.add_module(name, copy.deepcopy(module))
    classifier: nn.Module = copy.deepcopy(model.classifier)
    if prune_classifier:
        classifier = PrunedLinear.from_linear(model.classifier, 0.5)
    deployed = CondensedCondenseNet(features, classifier)
    deployed.requires_grad_(False)
    shared = GatherWorkspace()  # the index layers run one after another: one CPU buffer
    for module in deployed.modules():
        if isinstance(module, CondensedGroupConv2d | CondensedDenseBlock):
            module.workspace = shared
    return deployed.eval()


# ------------------------------------------------------------------------------------------
# builders


def _cifar(depth_stages: int, growth: Sequence[int], num_classes: int, **kwargs: Any):
    return CondenseNet([depth_stages] * 3, growth, num_classes=num_classes, **kwargs)


@register_model
def condensenet50(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-50 for CIFAR: 8 layers per block, growth 8-16-32, G = C = 4."""
    return _cifar(8, (8, 16, 32), num_classes, **kwargs)


@register_model
def condensenet74(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-74 for CIFAR: 12 layers per block, growth 8-16-32, G = C = 4."""
    return _cifar(12, (8, 16, 32), num_classes, **kwargs)


@register_model
def condensenet86(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-86 for CIFAR: 14 layers per block, growth 8-16-32, G = C = 4."""
    return _cifar(14, (8, 16, 32), num_classes, **kwargs)


@register_model
def condensenet98(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-98 for CIFAR: 16 layers per block, growth 8-16-32, G = C = 4."""
    return _cifar(16, (8, 16, 32), num_classes, **kwargs)


@register_model
def condensenet110(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-110 for CIFAR: 18 layers per block, growth 8-16-32, G = C = 4."""
    return _cifar(18, (8, 16, 32), num_classes, **kwargs)


@register_model
def condensenet122(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-122 for CIFAR: 20 layers per block, growth 8-16-32, G = C = 4."""
    return _cifar(20, (8, 16, 32), num_classes, **kwargs)


@register_model
def condensenet182(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-182 for CIFAR: 30 layers per block, growth 12-24-48, G = C = 4."""
    return _cifar(30, (12, 24, 48), num_classes, **kwargs)


def _imagenet(groups: int, num_classes: int, **kwargs: Any) -> CondenseNet:
    options = {"group_1x1": groups, "group_3x3": groups, "condense_factor": groups} | kwargs
    return CondenseNet(
        (4, 6, 8, 10, 8), (8, 16, 32, 64, 128), num_classes=num_classes, data="imagenet", **options
    )


@register_model
def condensenet74_imagenet_g4(num_classes: int = 1000, **kwargs: Any) -> CondenseNet:
    """CondenseNet-74 for ImageNet (blocks 4-6-8-10-8, growth 8-128), G = C = 4."""
    return _imagenet(4, num_classes, **kwargs)


@register_model
def condensenet74_imagenet_g8(num_classes: int = 1000, **kwargs: Any) -> CondenseNet:
    """CondenseNet-74 for ImageNet (blocks 4-6-8-10-8, growth 8-128), G = C = 8."""
    return _imagenet(8, num_classes, **kwargs)


@register_model
def condensenet_light(
    num_classes: int = 10,
    stages: Sequence[int] = (16, 16, 16),
    growth: Sequence[int] = (12, 12, 12),
    **kwargs: Any,
) -> CondenseNet:
    """CondenseNet-light: DenseNet-BC (default 16-16-16 layers, growth 12, dense 3x3 convs)
    whose 1x1 convs and transitions are LGC (G = C = 4), compression 0.5."""
    options = {"group_1x1": 4, "group_3x3": 1, "compression": 0.5} | kwargs
    return CondenseNet(stages, growth, num_classes=num_classes, **options)
