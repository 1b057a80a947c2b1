"""DGC: dynamic group convolution.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020.

Per example, each of ``h`` heads chooses which input channels it reads. For an input ``x`` of
shape ``(B, Cin, H, W)`` (already normalised and activated: the pre-activation BN-ReLU belongs
to the network) and ``R = max(1, Cin // squeeze_rate)`` (or ``hidden_width``):

* saliency: ``s = GAP(x)`` ``(B, Cin)``; head ``i`` has ``g_i = relu(fc2_i(relu(fc1_i(s))))``
  with ``fc1_i: Cin -> R`` (no bias) and ``fc2_i: R -> Cin`` (bias, initialised to 1), so
  ``g`` is ``(B, h, Cin)``. It is computed in at least float32 (also under autocast or for a
  half-precision layer): which channels are kept is a hard decision; the convolution runs in
  the input's dtype;
* gating: with ``k_off`` inactive channels, every entry of ``g_i`` that is ``<=`` the
  ``k_off``-th smallest value of that example and head is zeroed (ties can zero more), the
  others stay: ``x_i = x * g_i`` (kept channels are scaled by their saliency);
* convolution: head ``i`` convolves ``x_i`` with its own dense kernel ``(Cout/h, Cin, kh, kw)``;
  its output ``j`` is output channel ``j*h + i`` (interleaved). ``weight`` holds all heads in
  that output order, ``(Cout, Cin, kh, kw)``: head ``i``'s kernel is ``weight[i::h]``;
* regulariser (``aux_loss()``): ``lasso = sum_i mean(g_i)`` over batch and channels, before
  the zeroing; the paper adds it to the loss with weight ``1e-5``;
* schedule (``set_progress(p)``): ``k_off = round(Cin (1 - gate_factor) 1.5 (p - 1/12))`` for
  ``1/12 < p < 3/4``, ``round(Cin (1 - gate_factor))`` for ``p >= 3/4`` and 0 before;
  ``gate_factor`` is the kept fraction.

Schedule state: ``k_off`` lives only in the buffer ``inactive_channels`` (saved, loaded, copied
by an EMA, identical on every DDP rank); there is no Python copy of it. Eager paths that need a
host int (the sparse, grouped and Triton forms: their shapes depend on ``k_off``) read the
buffer's value at each forward; traced graphs (``torch.compile``, ``torch.export``, the
TorchScript tracer) always run the dense masked form, which takes ``k_off`` as a tensor, so a
graph never specialises on a value that may change. ``set_progress``, ``load_state_dict``,
``torch.func.functional_call`` with another buffer, an in-place write to the buffer and an EMA
update therefore take effect at once, in every path and in ``kept_channels``, ``structure()``,
``count_macs``, ``extra_repr`` and ``deploy()``. The deployed
:class:`SparseDynamicGroupConv2d` keeps its kept count as fixed structure, like
``nn.Conv2d``'s ``groups``: deploy again after changing the schedule.

Converted layers (``from_conv``, used by :func:`dynaconv.convert`): the paper's networks put a
BN-ReLU in front of every DGC layer, so ``s`` is of order 1 and the reference initialisation
(fc1, fc2 kaiming-normal, fc2 bias 1) gives ``g = relu(1 + n)`` with ``n`` of order 1. A
converted network has no such normalisation, and ``n`` grows with the input (apart from the
bias, ``g`` is positively homogeneous in ``s``). Since ``E[relu(1 + n)] > 1`` for zero-mean
``n``, and the kept channels are the largest ``g``, a kept channel is scaled by more than 1 on
average, by more the larger the input, which compounds from layer to layer: with BatchNorm at
its initial running statistics (eval mode), torchvision's ResNets and DenseNets converted
with the reference layer output infinities and NaN. ``from_conv`` therefore uses
``saliency_mode="neutral"``, which does two things:

* the descriptor is normalised, ``s <- s / rms(s)`` over the channels of each example (the
  role the BN-ReLU plays in the paper's networks), so ``g`` does not depend on the scale of
  ``x`` and cannot compound with it, now or once trained;
* fc2's weight starts at 0 and its bias at ``1 + o_c`` with distinct offsets ``|o_c| < 1e-3``
  (a random permutation of evenly spaced values, so no ties); fc1 as the reference. At
  initialisation every saliency is ``1 + o_c`` whatever the input: the expected scale of a
  kept channel is 1 (to ``1e-3``), the converted layer is the conv it came from with its input
  channels rescaled by ``1 + o_c``, and the kept channels are fixed until the saliency
  generator learns. fc2 gets a gradient from the first step (``dL/dW2 = dL/dg relu(fc1 s)^T``
  is not zero), fc1 from the second, as with zero-initialised residual branches.

The layer's constructor, the papers' networks and :mod:`dynaconv.compat` keep
``saliency_mode="reference"`` (exactly the reference code).

Execution paths (``impl``), all computing the same numbers:

* ``"dense"``: the paper's masked form, a grouped convolution of the ``h`` gated copies of
  ``x``: no MACs saved;
* ``"sparse"``: per example and head, gather the ``Cin - k_off`` highest-saliency channels and
  convolve only those with the matching kernel columns scaled by their saliency
  (``gate_factor`` of the dense MACs; plain PyTorch gather + unfold + bmm, exportable).
  Ties are reproduced exactly: the gathered channels that the reference zeroes get a scale of 0;
* ``"grouped"``: the same sparse computation as one convolution with a group per example and
  head over the gathered channels (a transposed convolution for stride 1, so that the gathered
  kernels need no reordering); on CPU the fastest form for kernels larger than 1x1; not
  exportable with a dynamic batch (the number of groups depends on it);
* ``"triton"``: the sparse computation as one fused implicit-GEMM kernel
  (:mod:`dynaconv.kernels.dgc`). When a gradient is needed, the same kernel is the forward of
  an autograd function whose backward runs cuDNN convolutions head by head over batch
  chunks (dense-cost gradients, transient memory a quarter of ``x``); zero padding only;
* ``"auto"``: on CUDA, ``"triton"`` (training with zero padding, and inference); on CPU,
  ``"sparse"`` for 1x1 stride-1 kernels and ``"grouped"`` otherwise (training and inference);
  on CUDA without Triton, ``"dense"`` for training and ``"sparse"`` for inference. While being
  traced the layer runs ``"dense"`` whatever ``impl`` says (see "Schedule state": nothing
  recompiles as ``k_off`` grows); export :meth:`DynamicGroupConv2d.deploy`'s module for the
  sparse form. An empty batch runs ``"sparse"`` (unless ``"dense"`` is asked for).

The lasso term is kept as a plain attribute set by each training-mode forward (not state: not
saved, dropped by copies), so ``aux_loss()`` belongs to the forward just run on that replica:
correct with DDP (each rank's own graph) and torch.compile (the attribute write is replayed).

Differences from the reference code: the BN-ReLU is not inside the layer; the hidden width is
``Cin // squeeze_rate`` for every ``Cin`` (the reference halves ``squeeze_rate`` when
``Cin < 80``: networks built like the paper's pass the halved rate, see
:func:`reference_squeeze_rate`), at least 1 (the reference makes a zero-width fc when
``Cin < squeeze_rate``, whose saliency is ``relu(fc2 bias)``: :mod:`dynaconv.compat` loads such
layers with ``hidden_width=0``); ``groups`` must be 1 (heads play that role); a bias is
allowed (added after the heads).

Shapes: input ``(B, Cin, H, W)`` -> output ``(B, Cout, H', W')`` as ``nn.Conv2d``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import (
    ConversionSkipped,
    ConvSpec,
    DynaConv2d,
    check_input,
    check_progress,
    kaiming_uniform_,
)

__all__ = ["DynamicGroupConv2d", "SparseDynamicGroupConv2d", "reference_squeeze_rate"]

Impl = Literal["auto", "dense", "sparse", "grouped", "triton"]
_IMPLS = ("auto", "dense", "sparse", "grouped", "triton")
_DEPLOYED_IMPLS = ("auto", "sparse", "grouped", "triton")
SaliencyMode = Literal["reference", "neutral"]
_SALIENCY_MODES = ("reference", "neutral")

#: Half-width of the spread of the neutral initialisation's saliencies around 1.
NEUTRAL_SPREAD = 1e-3
#: The normalised descriptor of an all-zero input is zero (not 0 / 0).
_RMS_FLOOR = 1e-30


def reference_squeeze_rate(in_channels: int, squeeze_rate: int) -> int:
    """The squeeze rate the reference code really uses: halved when ``in_channels < 80``."""
    return squeeze_rate // 2 if in_channels < 80 else squeeze_rate


def inactive_channels_at(progress: float, in_channels: int, gate_factor: float) -> int:
    """The schedule: number of inactive channels per example and head at ``progress``."""
    if progress >= 3.0 / 4:
        return round(in_channels * (1 - gate_factor))
    if progress > 1.0 / 12:
        return round(in_channels * (1 - gate_factor) * 3.0 / 2 * (progress - 1.0 / 12))
    return 0


def neutral_offsets(heads: int, channels: int, spread: float = NEUTRAL_SPREAD) -> Tensor:
    """``(heads, channels)`` distinct offsets in ``(-spread, spread)``, randomly placed.

    Each head's offsets are the evenly spaced values ``spread (2 (r + 1/2) / C - 1)`` for
    ``r = 0 .. C-1`` in a random order (``torch``'s generator): distinct, so that the
    saliencies ``1 + offset`` have no ties, and at most ``spread`` away from 1.
    """
    ranks = torch.stack([torch.randperm(channels) for _ in range(heads)]).to(torch.float64)
    return (spread * (2 * (ranks + 0.5) / channels - 1)).to(torch.float32)


def _tracing() -> bool:
    """Whether torch.compile, torch.export or the TorchScript tracer is tracing."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing()


# --------------------------------------------------------------------------------------------
# The math shared by the layer and its deployed form.


def saliency(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    normalize: bool = False,
) -> Tensor:
    """``g``: ``(B, h, Cin)`` saliencies of ``x`` ``(B, Cin, H, W)`` for every head.

    With ``normalize`` (``saliency_mode="neutral"``), the pooled descriptor ``s`` is divided by
    its root mean square over the channels, so ``g`` does not depend on the scale of ``x``.
    """
    heads, hidden_width, channels = fc1_weight.shape
    # Which channels are kept is a hard decision: it is made in at least float32, also under
    # autocast, so that reduced precision changes the arithmetic but not the selection.
    dtype = torch.promote_types(fc1_weight.dtype, torch.float32)
    with _autocast_off(x):
        pooled = x.to(dtype).mean(dim=(2, 3))
        if normalize:
            rms = pooled.square().mean(dim=1, keepdim=True).sqrt()
            pooled = pooled / rms.clamp_min(_RMS_FLOOR)
        weight1 = fc1_weight.to(dtype).reshape(heads * hidden_width, channels)
        hidden = torch.relu(F.linear(pooled, weight1))
        per_head = hidden.reshape(pooled.shape[0], heads, hidden_width).transpose(0, 1)  # h,B,R
        out = torch.baddbmm(
            fc2_bias.to(dtype).unsqueeze(1), per_head, fc2_weight.to(dtype).transpose(1, 2)
        )
        return torch.relu(out).transpose(0, 1)


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def lasso(g: Tensor) -> Tensor:
    """The regulariser: the sum over heads of the mean saliency (0 for an empty batch)."""
    if g.shape[0] == 0:
        return g.sum()  # the mean of nothing would be NaN
    return g.mean(dim=(0, 2)).sum()


def gate_dense(g: Tensor, inactive: Tensor) -> Tensor:
    """Zero every entry ``<=`` the ``inactive``-th smallest per example and head.

    ``inactive`` is a 0-dim integer tensor (no Python int needed, so no recompiles).
    """
    detached = g.detach()
    ranked = detached.sort(dim=-1).values
    position = (inactive - 1).clamp(min=0).reshape(1, 1, 1).expand(*g.shape[:2], 1)
    threshold = ranked.gather(-1, position)
    drop = (detached <= threshold) & (inactive > 0)
    return g.masked_fill(drop, 0.0)


def select_kept(g: Tensor, inactive: int) -> tuple[Tensor, Tensor]:
    """``(index, scale)``, each ``(B, h, K)`` with ``K = Cin - inactive``.

    ``index`` holds the ``K`` highest-saliency channels; ``scale`` their gated saliency, which
    is 0 for the candidates the reference zeroes because they tie with the threshold.
    """
    channels = g.shape[-1]
    keep = channels - inactive
    if inactive == 0:
        index = torch.arange(channels, device=g.device).expand(*g.shape[:2], channels)
        return index, g
    top = g.detach().topk(keep + 1, dim=-1)
    index = top.indices[..., :keep]
    threshold = top.values[..., keep:]
    values = g.gather(-1, index) if g.requires_grad else top.values[..., :keep]
    scale = values.masked_fill(values.detach() <= threshold, 0.0)
    return index, scale


def head_kernels(weight: Tensor, heads: int) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` regrouped head-major: head ``i``'s rows first."""
    cout = weight.shape[0]
    return weight.reshape(cout // heads, heads, *weight.shape[1:]).transpose(0, 1).flatten(0, 1)


def interleave(out: Tensor, heads: int) -> Tensor:
    """Head-major channels ``(B, h*Cout/h, ...)`` -> output channel ``j*h + i`` from head ``i``."""
    batch, channels = out.shape[:2]
    grouped = out.reshape(batch, heads, channels // heads, *out.shape[2:])
    return grouped.transpose(1, 2).reshape(out.shape)


def dense_masked_conv(
    x: Tensor, weight: Tensor, gated: Tensor, spec: ConvSpec, heads: int
) -> Tensor:
    """The reference form: each head convolves its gated copy of ``x`` (grouped conv)."""
    batch, cin, height, width = x.shape
    # The saliencies are float32 (or float64); the convolution runs in x's dtype.
    scale = gated.to(x.dtype)[..., None, None]
    copies = (x.unsqueeze(1) * scale).reshape(batch, heads * cin, height, width)
    out = spec.conv2d(copies, head_kernels(weight, heads), None, groups=heads)
    return interleave(out, heads)


def gathered_conv(
    x: Tensor, weight: Tensor, index: Tensor, scale: Tensor, spec: ConvSpec, heads: int
) -> Tensor:
    """The sparse form in plain PyTorch: gather kept channels, unfold, one batched matmul.

    ``x`` ``(B, Cin, H, W)``, ``weight`` ``(Cout, Cin, kh, kw)``, ``index``/``scale``
    ``(B, h, K)``. Only ``K/Cin`` of the dense MACs. No data-dependent control flow, so it
    exports with ``torch.export``.
    """
    batch, cin = x.shape[:2]
    cout = weight.shape[0]
    keep = index.shape[-1]
    taps = spec.kernel_numel
    padded = spec.pad_input(x)
    out_h, out_w = spec.output_size(x.shape[2], x.shape[3])
    positions = out_h * out_w  # explicit sizes: -1 cannot be inferred for an empty batch
    if taps == 1 and spec.stride == (1, 1):
        columns = padded.reshape(batch, cin, 1, positions)
    else:
        columns = F.unfold(padded, spec.kernel_size, spec.dilation, 0, spec.stride)
        columns = columns.reshape(batch, cin, taps, positions)
    rows = (index + torch.arange(batch, device=x.device).reshape(batch, 1, 1) * cin).reshape(-1)
    picked = columns.reshape(batch * cin, taps * positions).index_select(0, rows)
    picked = picked.reshape(batch * heads, keep * taps, positions)
    per_head = weight.reshape(cout // heads, heads, cin, taps).permute(1, 2, 0, 3)  # h,Cin,Co/h,T
    head_rows = index + torch.arange(heads, device=x.device).reshape(1, heads, 1) * cin
    # index_select, not advanced indexing: the backward of per_head[heads, index] is an
    # index_put_ with accumulate, whose multi-threaded CPU kernel adds the many examples that
    # keep the same channel in a varying order (run-to-run different weight gradients).
    # index_select's backward (index_add_) adds them in index order.
    kernels = per_head.reshape(heads * cin, (cout // heads) * taps).index_select(
        0, head_rows.reshape(-1)
    )
    kernels = kernels.reshape(batch, heads, keep, cout // heads, taps)
    kernels = kernels * scale.to(weight.dtype)[..., None, None]  # B,h,K,Co/h,T
    kernels = kernels.permute(0, 1, 3, 2, 4).reshape(batch * heads, cout // heads, keep * taps)
    out = torch.bmm(kernels, picked).reshape(batch, heads * (cout // heads), out_h, out_w)
    return interleave(out, heads)


def transposed_head_kernels(weight: Tensor, heads: int, flipped: bool = True) -> Tensor:
    """``weight`` as rows ``(h*Cin, Cout/h, kh, kw)``: row ``i*Cin + c`` is input channel ``c``
    of head ``i`` (spatially flipped with ``flipped``); a transposed convolution's kernel layout.

    Gathering the kept rows of an example and head gives, as is, the ``conv_transpose2d``
    kernel that computes that head's stride-1 convolution over the kept channels.
    """
    cout, cin, kh, kw = weight.shape
    per_head = (weight.flip(2, 3) if flipped else weight).reshape(cout // heads, heads, cin, kh, kw)
    return per_head.permute(1, 2, 0, 3, 4).reshape(heads * cin, cout // heads, kh, kw)


def grouped_gathered_conv(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    scale: Tensor,
    spec: ConvSpec,
    heads: int,
    transposed: Tensor | None = None,
) -> Tensor:
    """The sparse form as one grouped convolution with a group per example and head.

    Same inputs and numbers as :func:`gathered_conv` (``K/Cin`` of the dense MACs), but the
    kept channels go to one ``B*h``-group convolution instead of an unfolded matmul, which is
    several times faster where the convolution library is (CPU). The kernels are gathered per
    example and head as rows of :func:`transposed_head_kernels` (``transposed``, computed from
    ``weight`` when not given): for stride 1 they feed a transposed convolution as they are;
    otherwise they are reordered for a plain grouped conv. The saliency scale multiplies
    whichever of the gathered input and kernels is smaller. Differentiable; ``groups`` depends
    on the batch, so ``torch.export`` specialises it (use :func:`gathered_conv` to export).
    """
    padding = _zero_padding(spec)
    if padding is None:
        x, padding = spec.pad_input(x), (0, 0)
    batch, cin, height, width = x.shape
    cout, _, kh, kw = weight.shape
    keep = index.shape[-1]
    groups = batch * heads
    rows = (index + torch.arange(batch, device=x.device).reshape(batch, 1, 1) * cin).reshape(-1)
    picked = x.reshape(batch * cin, height * width).index_select(0, rows)
    scale_input = height * width <= (cout // heads) * kh * kw
    if scale_input:
        picked = picked * scale.reshape(-1, 1).to(picked.dtype)
    picked = picked.reshape(1, groups * keep, height, width)

    dilation = spec.dilation
    transposed_padding = tuple(d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding))
    as_transposed = spec.stride == (1, 1) and min(transposed_padding) >= 0
    if transposed is None or not as_transposed:
        transposed = transposed_head_kernels(weight, heads, flipped=as_transposed)
    head_rows = index + torch.arange(heads, device=x.device).reshape(1, heads, 1) * cin
    kernels = transposed.index_select(0, head_rows.reshape(-1))  # (B*h*K, Cout/h, kh, kw)
    if not scale_input:
        kernels = kernels * scale.reshape(-1, 1, 1, 1).to(kernels.dtype)
    if as_transposed:
        out = F.conv_transpose2d(picked, kernels, None, 1, transposed_padding, 0, groups, dilation)
    else:
        kernels = kernels.reshape(groups, keep, cout // heads, kh, kw).transpose(1, 2)
        kernels = kernels.reshape(groups * (cout // heads), keep, kh, kw)
        out = F.conv2d(picked, kernels, None, spec.stride, padding, dilation, groups)
    return interleave(out.reshape(batch, cout, *out.shape[2:]), heads)


def triton_kernel_layout(weight: Tensor, heads: int) -> Tensor:
    """``weight`` as the Triton kernel reads it: ``(h, kh, kw, Cin, Cout/h)``, contiguous."""
    cout, cin, kh, kw = weight.shape
    return weight.reshape(cout // heads, heads, cin, kh, kw).permute(1, 3, 4, 2, 0).contiguous()


def top_candidates(g: Tensor, inactive: int) -> tuple[Tensor, Tensor, int]:
    """``(index, values, keep)`` for the Triton kernel, straight from one top-k.

    With ``inactive > 0``: the ``keep + 1`` largest saliencies per row; the last is the
    threshold of the tie rule, applied inside the kernel. With ``inactive == 0``: every channel.
    """
    channels = g.shape[-1]
    if inactive == 0:
        index = torch.arange(channels, device=g.device).expand(*g.shape[:2], channels)
        return index, g, channels
    keep = channels - inactive
    top = g.topk(keep + 1, dim=-1)
    return top.indices, top.values, keep


def _run_triton(
    x: Tensor,
    kernel_weight: Tensor,
    g: Tensor,
    inactive: int,
    spec: ConvSpec,
    heads: int,
) -> Tensor:
    from ..kernels.dgc import gathered_conv_triton

    if spec.padding_mode != "zeros" or spec.padding == "same":
        x = spec.pad_input(x)
        pad = (0, 0)
    else:
        pad = spec.padding  # type: ignore[assignment]
    index, values, keep = top_candidates(g, inactive)
    return gathered_conv_triton(
        x, kernel_weight, index, values, heads, spec.stride, pad, spec.dilation, keep
    )


def _zero_padding(spec: ConvSpec) -> tuple[int, int] | None:
    """The symmetric zero padding of ``spec``, or None (other modes, asymmetric 'same')."""
    if spec.pads_explicitly:
        return None
    left, right, top, bottom = spec.explicit_padding()
    if left != right or top != bottom:
        return None
    return (top, left)


def _pick_impl(
    impl: str, needs_grad: bool, training: bool, spec: ConvSpec, *tensors: Tensor
) -> str:
    from ..kernels import triton_usable

    if impl != "dense" and not _tracing() and tensors[0].shape[0] == 0:
        return "sparse"  # an empty batch: no groups to form, no kernel grid to launch
    if impl == "triton":
        if not triton_usable(*tensors):
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"
            )
        if needs_grad and _zero_padding(spec) is None:
            raise ValueError(
                "impl='triton' trains only with zero padding (padding_mode='zeros', symmetric); "
                "use 'sparse' or 'dense'"
            )
        return impl
    if impl != "auto":
        return impl
    compiling = _tracing()
    on_gpu = all(t.is_cuda for t in tensors)  # never the (slow) interpreter by default
    if on_gpu and triton_usable(*tensors) and not compiling:
        if not needs_grad:
            return "triton"
        if not training:
            return "sparse"
        return "triton" if _zero_padding(spec) is not None else "dense"
    # On CPU the sparse forms are the fastest measured (benchmarks/RESULTS.md), for training
    # too: gather + bmm where there is nothing to unfold (1x1, stride 1), the grouped conv
    # otherwise. The grouped form specialises on the batch and k_off: not in traced graphs.
    if all(t.device.type == "cpu" for t in tensors) and not compiling:
        return "sparse" if spec.kernel_numel == 1 and spec.stride == (1, 1) else "grouped"
    if needs_grad and training:
        return "dense"
    return "sparse"


class _GatedHeadsConv(torch.autograd.Function):
    """Training form of the sparse path: the fused Triton kernel forward (``K/Cin`` of the
    MACs, no gated copies of ``x``), a backward in cuDNN convolutions head by head over
    ``chunks`` batch chunks (the transient gated input and its gradient are ``1/chunks`` of
    ``x`` each).

    Inputs: ``x`` ``(B, Cin, H, W)``, ``gated`` ``(B, h, Cin)`` (the zeroed saliencies),
    ``weight`` ``(Cout, Cin, kh, kw)``, ``index`` ``(B, h, K)`` (kept channels).
    """

    @staticmethod
    def forward(ctx, x, gated, weight, index, spec, heads, use_triton, chunks=2):  # type: ignore[override]
        padding = _zero_padding(spec)
        ctx.conv_args = (spec.stride, padding, spec.dilation)
        ctx.heads = heads
        ctx.chunks = chunks
        ctx.save_for_backward(x, gated, weight)
        if use_triton:
            from ..kernels.dgc import gathered_conv_triton

            scale = gated.gather(-1, index)
            return gathered_conv_triton(
                x,
                triton_kernel_layout(weight, heads),
                index,
                scale,
                heads,
                spec.stride,
                padding,
                spec.dilation,
            )
        outs = [
            F.conv2d(
                x * gated[:, i, :, None, None],
                weight[i::heads],
                None,
                spec.stride,
                padding,
                spec.dilation,
            )
            for i in range(heads)
        ]
        return torch.stack(outs, dim=2).flatten(1, 2)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, gated, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        heads = ctx.heads
        batch = x.shape[0]
        chunk = max(1, -(-batch // ctx.chunks))
        grad_x = torch.zeros_like(x)
        grad_gated = torch.empty_like(gated)
        grad_weight = torch.zeros_like(weight)
        for i in range(heads):
            kernel = weight[i::heads].to(x.dtype)  # under autocast x may be half precision
            for start in range(0, batch, chunk):
                part = slice(start, start + chunk)
                scale = gated[part, i, :, None, None].to(x.dtype)
                grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
                    grad_out[part, i::heads].contiguous(),
                    x[part] * scale,
                    kernel,
                    None,
                    list(stride),
                    list(padding),
                    list(dilation),
                    False,
                    [0, 0],
                    1,
                    [True, True, False],
                )
                grad_weight[i::heads] += grad_w.to(weight.dtype)
                rows = grad_in.shape[0] * grad_in.shape[1]  # per-channel dot products, no temp
                grad_gated[part, i] = (
                    torch.bmm(grad_in.reshape(rows, 1, -1), x[part].reshape(rows, -1, 1))
                    .reshape(grad_in.shape[:2])
                    .to(gated.dtype)
                )
                grad_x[part].addcmul_(grad_in, scale)
        return grad_x, grad_gated, grad_weight, None, None, None, None, None


def _check_options(
    in_channels: int, heads: Any, squeeze_rate: Any, gate_factor: Any, impl: Any
) -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if isinstance(squeeze_rate, bool) or not isinstance(squeeze_rate, int) or squeeze_rate <= 0:
        raise ValueError(f"squeeze_rate must be a positive int, got {squeeze_rate!r}")
    if (
        isinstance(gate_factor, bool)
        or not isinstance(gate_factor, int | float)
        or not 0.0 < gate_factor <= 1.0
    ):
        raise ValueError(
            f"gate_factor (the kept fraction of input channels) must be in (0, 1], got {gate_factor!r}"
        )
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if in_channels - round(in_channels * (1 - gate_factor)) < 1:
        raise ValueError(
            f"gate_factor={gate_factor} keeps no channel of in_channels={in_channels}: "
            "in_channels * gate_factor must round to at least 1"
        )


class DynamicGroupConv2d(DynaConv2d):
    """Dynamic group convolution (drop-in for ``nn.Conv2d`` with ``groups=1``).

    Args: those of ``nn.Conv2d`` (``groups`` must be 1), plus
        heads: number of heads (``out_channels`` must be divisible by it), default 4.
        squeeze_rate: hidden width of the saliency generators is ``max(1, Cin // squeeze_rate)``.
        gate_factor: kept fraction of the input channels at the end of the schedule (0.25).
        impl: ``"auto"``, ``"dense"``, ``"sparse"``, ``"grouped"`` or ``"triton"`` (see the
            module docstring).
        saliency_mode: ``"reference"`` (the paper's saliency generator and initialisation) or
            ``"neutral"`` (the descriptor normalised to unit RMS, every saliency starting at
            ``1 +- 1e-3``; what ``from_conv`` uses, see the module docstring).
        hidden_width: the saliency generators' hidden width ``R``; default
            ``max(1, Cin // squeeze_rate)``. 0 is allowed (the saliency is then
            ``relu(fc2 bias)``), for layers loaded from the reference code.

    ``weight`` is the dense kernel of all heads (output channel ``j*h + i`` from head ``i``).
    ``inactive_channels`` (buffer) is the current ``k_off``; ``aux_loss()`` is the lasso term of
    the last training-mode forward (a zero tensor before any).
    """

    method = "dgc"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.25,
        impl: Impl = "auto",
        saliency_mode: SaliencyMode = "reference",
        hidden_width: int | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
        )
        if groups != 1:
            raise ValueError(f"groups must be 1 for DGC (the heads replace groups), got {groups}")
        _check_options(in_channels, heads, squeeze_rate, gate_factor, impl)
        if saliency_mode not in _SALIENCY_MODES:
            raise ValueError(
                f"saliency_mode must be one of {_SALIENCY_MODES}, got {saliency_mode!r}"
            )
        if hidden_width is not None and (
            isinstance(hidden_width, bool) or not isinstance(hidden_width, int) or hidden_width < 0
        ):
            raise ValueError(f"hidden_width must be None or an int >= 0, got {hidden_width!r}")
        if out_channels % heads:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by heads ({heads})")
        factory = {"device": device, "dtype": dtype}
        self.heads = heads
        self.squeeze_rate = squeeze_rate
        self.gate_factor = float(gate_factor)
        self.impl = impl
        self.saliency_mode = saliency_mode
        hidden = max(1, in_channels // squeeze_rate) if hidden_width is None else hidden_width
        self.hidden = hidden
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.spec.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, in_channels, **factory))
        self.fc2_weight = nn.Parameter(torch.empty(heads, in_channels, hidden, **factory))
        self.fc2_bias = nn.Parameter(torch.empty(heads, in_channels, **factory))
        # k_off: the only copy of the schedule state (no Python mirror, see the module docstring).
        self.register_buffer("inactive_channels", torch.zeros((), dtype=torch.long, device=device))
        self._last_lasso: Tensor | None = None
        #: Batch chunks of the Triton training path's backward (memory/launches trade-off).
        self.backward_chunks = 2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.spec.in_channels * self.spec.kernel_numel
        kaiming_uniform_(self.weight, fan_in)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        with torch.no_grad():  # kaiming-normal of each head's Linear layers (fc1 always)
            self.fc1_weight.normal_(0.0, math.sqrt(2.0 / self.spec.in_channels))
            if self.saliency_mode == "reference":  # fc2 kaiming-normal, bias 1
                if self.hidden:
                    self.fc2_weight.normal_(0.0, math.sqrt(2.0 / self.hidden))
                self.fc2_bias.fill_(1.0)
            else:  # "neutral": g = 1 + a distinct offset in (-eps, eps) per channel
                self.fc2_weight.zero_()
                self.fc2_bias.copy_(1.0 + neutral_offsets(self.heads, self.spec.in_channels))

    # ---------------------------------------------------------------------------- schedule
    @property
    def _inactive(self) -> int:
        """``k_off`` read from the buffer ``inactive_channels`` (validated; eager mode only)."""
        count = int(self.inactive_channels)
        if not 0 <= count < self.spec.in_channels:
            raise ValueError(
                f"inactive_channels={count} is out of [0, in_channels) = "
                f"[0, {self.spec.in_channels})"
            )
        return count

    @property
    def kept_channels(self) -> int:
        """Channels each head reads per example now (``Cin - k_off``, from the buffer)."""
        return self.spec.in_channels - self._inactive

    def set_inactive_channels(self, count: int) -> None:
        """Set ``k_off`` directly (``set_progress`` computes it from the schedule)."""
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"inactive channel count must be an int, got {count!r}")
        if not 0 <= count < self.spec.in_channels:
            raise ValueError(
                f"inactive channel count must be in [0, in_channels) = [0, {self.spec.in_channels}), "
                f"got {count}"
            )
        with torch.no_grad():
            self.inactive_channels.fill_(count)

    def set_progress(self, progress: float) -> None:
        progress = check_progress(progress)
        self.set_inactive_channels(
            inactive_channels_at(progress, self.spec.in_channels, self.gate_factor)
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        count = int(self.inactive_channels)
        if not 0 <= count < self.spec.in_channels:
            raise ValueError(
                f"{prefix}inactive_channels={count} out of [0, in_channels) = "
                f"[0, {self.spec.in_channels})"
            )

    # ---------------------------------------------------------------------------- forward
    def saliency(self, x: Tensor) -> Tensor:
        """``(B, h, Cin)`` saliencies of ``x`` (before gating)."""
        return saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        g = self.saliency(x)
        if self.training:
            # The lasso term of this forward, read by aux_loss(): a plain attribute (not
            # schedule state), so every DDP rank / compiled graph uses its own forward's value.
            self._last_lasso = lasso(g)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if _tracing():
            # Traced graphs take k_off as the buffer tensor: nothing specialises on its value.
            impl = "dense"
        else:
            impl = _pick_impl(self.impl, needs_grad, self.training, self.spec, x)
        if impl == "dense":
            out = dense_masked_conv(
                x, self.weight, gate_dense(g, self.inactive_channels), self.spec, self.heads
            )
        else:
            out = self._sparse_forward(x, g, impl, needs_grad)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def _sparse_forward(self, x: Tensor, g: Tensor, impl: str, needs_grad: bool) -> Tensor:
        """The gathered forms (eager only): ``k_off`` is read from the buffer as a host int."""
        inactive = self._inactive
        if impl == "triton" and needs_grad:
            gated = gate_dense(g, self.inactive_channels)
            index = select_kept(g, inactive)[0]
            return _GatedHeadsConv.apply(
                x, gated, self.weight, index, self.spec, self.heads, True, self.backward_chunks
            )
        if impl == "triton":
            kernel_weight = triton_kernel_layout(self.weight, self.heads)
            return _run_triton(x, kernel_weight, g, inactive, self.spec, self.heads)
        index, scale = select_kept(g, inactive)
        if impl == "grouped":
            return grouped_gathered_conv(x, self.weight, index, scale, self.spec, self.heads)
        return gathered_conv(x, self.weight, index, scale, self.spec, self.heads)

    def __getstate__(self) -> dict[str, Any]:
        # The last lasso term is part of an autograd graph: copies and pickles drop it.
        state = self.__dict__.copy()
        state["_last_lasso"] = None
        return state

    def aux_loss(self) -> Tensor:
        """``lasso`` of the last training-mode forward (zero before any)."""
        if self._last_lasso is None:
            return super().aux_loss()
        return self._last_lasso

    # ---------------------------------------------------------------------------- contract
    def deploy(self) -> SparseDynamicGroupConv2d:
        """The sparse inference module (gathers ``Cin - k_off`` channels per head)."""
        return SparseDynamicGroupConv2d.from_layer(self)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.25,
        impl: Impl = "auto",
        saliency_mode: SaliencyMode = "neutral",
        **options: Any,
    ) -> DynamicGroupConv2d:
        """A DGC layer with ``conv``'s kernel (every head keeps its rows of it).

        ``saliency_mode="neutral"`` (the default here) normalises the saliency descriptor and
        starts every saliency at ``1 +- 1e-3`` whatever the input, so the layer starts as
        ``conv`` (module docstring, "Converted layers"); ``"reference"`` gives the paper's
        layer.
        """
        if options:
            raise ValueError(f"unknown DGC option(s): {sorted(options)}")
        if type(conv) is not nn.Conv2d:
            raise ConversionSkipped(f"{type(conv).__name__} is not a plain nn.Conv2d")
        if conv.groups != 1:
            raise ConversionSkipped(f"grouped conv (groups={conv.groups}); DGC needs groups=1")
        if conv.out_channels % heads:
            raise ConversionSkipped(
                f"out_channels={conv.out_channels} not divisible by heads={heads}"
            )
        if conv.in_channels - round(conv.in_channels * (1 - gate_factor)) < 1:
            raise ConversionSkipped(
                f"in_channels={conv.in_channels} too few to keep a fraction {gate_factor}"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            1,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            heads=heads,
            squeeze_rate=squeeze_rate,
            gate_factor=gate_factor,
            impl=impl,
            saliency_mode=saliency_mode,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    def _saliency_macs(self, batch: int) -> int:
        return batch * self.heads * 2 * self.spec.in_channels * self.hidden

    def count_macs(
        self, input_shape: Sequence[int], output_shape: Sequence[int]
    ) -> tuple[int, int]:
        """Dense: the full conv of every head + the saliency FCs. Active: each head convolves
        ``Cin - k_off`` channels (the current ``k_off``) + the saliency FCs."""
        conv = self.spec.dense_macs(output_shape)
        fcs = self._saliency_macs(int(output_shape[0]))
        active = conv // self.spec.in_channels * self.kept_channels
        return conv + fcs, active + fcs

    def count_macs_reference(
        self, input_shape: Sequence[int], output_shape: Sequence[int]
    ) -> tuple[float, float]:
        """What the reference counter (``utils.measure_model`` of the DGC code) counts.

        Worked out from its totals for DyDenseNet-86 (CIFAR, 71,037,118) and DyResNet-18
        (224 px, 890,396,782.4), which it reproduces exactly: per layer, the head convs at
        ``gate_factor`` of their dense MACs (the fraction, not the current ``k_off``, hence the
        non-integer total), the global average pool (one op per input element), and per head
        ``fc1`` (``Cin R``), its ReLU (``R``), ``fc2`` with bias (``R Cin + Cin``), its ReLU
        (``Cin``) and one more op per saliency (``Cin``, the gating). The layer's
        BN-ReLU (its ReLU: one op per input element) lives in the network, whose ``nn.ReLU``
        the counter counts. Dense: the same with the full conv.
        """
        batch = int(input_shape[0])
        cin, hidden = self.spec.in_channels, self.hidden
        conv = self.spec.dense_macs(output_shape)
        pool = math.prod(int(s) for s in input_shape)
        per_head = cin * hidden + hidden + hidden * cin + cin + cin + cin
        extra = pool + batch * self.heads * per_head
        active = conv * self.gate_factor + extra
        return (conv + extra, int(active) if float(active).is_integer() else active)

    def structure(self) -> str:
        return (
            f"{self.heads} heads, {self.kept_channels}/{self.spec.in_channels} channels kept"
            f" (target {self.gate_factor:g})"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, heads={self.heads}, squeeze_rate={self.squeeze_rate}, "
            f"gate_factor={self.gate_factor:g}, inactive={int(self.inactive_channels)}, "
            f"impl={self.impl!r}"
        )


class SparseDynamicGroupConv2d(nn.Module):
    """The deployed DGC layer: computes only the kept channels of each example and head.

    Same numbers as :class:`DynamicGroupConv2d` in eval mode, at ``K/Cin`` of the conv MACs
    (``K = Cin - k_off``). ``impl``: ``"auto"``, ``"sparse"``, ``"grouped"`` or ``"triton"``,
    chosen as in :class:`DynamicGroupConv2d`'s inference (module docstring).

    ``kept`` (``K``) is fixed structure, like ``nn.Conv2d``'s ``groups``: a plain int, not
    state (not in the state dict), read by every path, traced ones included (their shapes
    depend on it). It is the layer's count when :meth:`DynamicGroupConv2d.deploy` ran.
    """

    def __init__(
        self,
        spec: ConvSpec,
        heads: int,
        kept: int,
        weight: Tensor,
        bias: Tensor | None,
        fc1_weight: Tensor,
        fc2_weight: Tensor,
        fc2_bias: Tensor,
        impl: str = "auto",
        saliency_mode: SaliencyMode = "reference",
    ) -> None:
        super().__init__()
        if saliency_mode not in _SALIENCY_MODES:
            raise ValueError(
                f"saliency_mode must be one of {_SALIENCY_MODES}, got {saliency_mode!r}"
            )
        if impl not in _DEPLOYED_IMPLS:
            raise ValueError(f"impl must be one of {_DEPLOYED_IMPLS}, got {impl!r}")
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= spec.in_channels:
            raise ValueError(
                f"kept must be an int in [1, in_channels={spec.in_channels}], got {kept!r}"
            )
        self.spec = spec
        self.heads = heads
        self.kept = kept
        self.impl = impl
        self.saliency_mode = saliency_mode
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.fc1_weight = nn.Parameter(fc1_weight.detach().clone(), requires_grad=False)
        self.fc2_weight = nn.Parameter(fc2_weight.detach().clone(), requires_grad=False)
        self.fc2_bias = nn.Parameter(fc2_bias.detach().clone(), requires_grad=False)
        self._layouts: tuple[tuple[Any, ...], Tensor, Tensor] | None = None

    def layouts(self) -> tuple[Tensor, Tensor]:
        """``weight`` in the layouts the Triton and grouped forms read: ``(kernel_weight,
        transposed_weight)``. Derived from ``weight`` and cached (not state) while ``weight`` is
        the same tensor, unchanged in place; so loading, ``functional_call`` and in-place writes
        are followed. Traced graphs derive them in the graph."""
        weight = self.weight.detach()
        if _tracing():
            return triton_kernel_layout(weight, self.heads), transposed_head_kernels(
                weight, self.heads
            )
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        if self._layouts is None or self._layouts[0] != key:
            kernel = triton_kernel_layout(weight, self.heads)
            transposed = transposed_head_kernels(weight, self.heads).contiguous()
            self._layouts = (key, kernel, transposed)
        return self._layouts[1], self._layouts[2]

    @classmethod
    def from_layer(cls, layer: DynamicGroupConv2d) -> SparseDynamicGroupConv2d:
        impl = layer.impl if layer.impl in _DEPLOYED_IMPLS else "auto"
        return cls(
            layer.spec,
            layer.heads,
            layer.kept_channels,
            layer.weight,
            layer.bias,
            layer.fc1_weight,
            layer.fc2_weight,
            layer.fc2_bias,
            impl,
            layer.saliency_mode,
        )

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        g = saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )
        inactive = self.spec.in_channels - self.kept
        impl = _pick_impl(self.impl, False, False, self.spec, x)
        if impl == "triton":
            out = _run_triton(x, self.layouts()[0], g, inactive, self.spec, self.heads)
        elif impl == "grouped":
            index, scale = select_kept(g, inactive)
            out = grouped_gathered_conv(
                x, self.weight, index, scale, self.spec, self.heads, self.layouts()[1]
            )
        else:
            index, scale = select_kept(g, inactive)
            out = gathered_conv(x, self.weight, index, scale, self.spec, self.heads)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def count_macs(
        self, input_shape: Sequence[int], output_shape: Sequence[int]
    ) -> tuple[int, int]:
        conv = self.spec.dense_macs(output_shape) // self.spec.in_channels * self.kept
        fcs = (
            int(output_shape[0]) * self.heads * 2 * self.spec.in_channels * self.fc1_weight.shape[1]
        )
        return conv + fcs, conv + fcs

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, stride={s.stride}, "
            f"heads={self.heads}, kept={self.kept}, impl={self.impl!r}"
        )
