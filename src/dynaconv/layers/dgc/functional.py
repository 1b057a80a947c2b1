"""DGC's tensor math as functions (Su et al., "Dynamic Group Convolution for Accelerating
Convolutional Neural Networks", ECCV 2020; see :mod:`dynaconv.layers.dgc`).

Shared by the training layer, its deployed form and the Triton kernels: the saliency
generator ``g`` ``(B, h, Cin)``, the gating (the tie rule of the reference), the lasso term,
and the exact forms of the gated convolution: ``"masked"`` (:func:`dense_masked_conv`),
``"bmm"`` (:func:`gathered_conv`) and ``"batch_grouped"`` (:func:`grouped_gathered_conv`), plus
the weight layouts the Triton kernel reads.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ...spec import ConvSpec

__all__ = [
    "SALIENCY_MODES",
    "SaliencyMode",
    "block_rows",
    "dense_masked_conv",
    "gate_dense",
    "gate_from_kept",
    "gather_width",
    "gathered_conv",
    "grouped_gathered_conv",
    "head_blocked_conv",
    "head_gemm_single",
    "head_grouped_conv",
    "head_kernels",
    "interleave",
    "kernel_rows",
    "lasso",
    "runs_transposed",
    "saliency",
    "select_kept",
    "tap_rows",
    "top_candidates",
    "transposed_head_kernels",
    "triton_kernel_layout",
    "zero_padding",
]

#: How the saliency generator reads its input: ``"reference"`` (the paper's code: the pooled
#: descriptor as it is) or ``"neutral"`` (divided by its root mean square, :func:`saliency`).
SaliencyMode = Literal["reference", "neutral"]
SALIENCY_MODES: tuple[str, ...] = get_args(SaliencyMode)

#: The normalised descriptor of an all-zero input is zero (not 0 / 0).
_RMS_FLOOR = 1e-30


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
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()  # entering autocast costs host time on every call


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


def select_kept(g: Tensor, inactive: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """``(index, scale)``, each ``(B, h, W)``: ``W = K = Cin - inactive`` by default.

    ``index`` holds the ``K`` highest-saliency channels; ``scale`` their gated saliency, which
    is 0 for the candidates the reference zeroes because they tie with the threshold. With
    ``width`` ``W > K`` (at most ``Cin``), the next ``W - K`` channels by saliency follow,
    each with scale 0 (they add exact zeros): a gathered convolution over a multiple of the
    CPU's vector width of channels per group runs much faster (:func:`gather_width`).
    """
    channels = g.shape[-1]
    keep = channels - inactive
    if inactive == 0:
        index = torch.arange(channels, device=g.device).expand(*g.shape[:2], channels)
        return index, g
    width = keep if width is None else min(max(width, keep), channels)
    top = g.detach().topk(max(keep + 1, width), dim=-1)
    index = top.indices[..., :width]
    threshold = top.values[..., keep : keep + 1]
    values = g.gather(-1, index) if g.requires_grad else top.values[..., :width]
    # Sorted in descending order: every candidate from position K on is <= the threshold.
    scale = values.masked_fill(values.detach() <= threshold, 0.0)
    return index, scale


#: The channel multiple :func:`gather_width` rounds a gathered group up to: oneDNN's CPU
#: convolutions block channels by 16 (AVX-512) or 8; a group of 29 channels ran 1.8x slower
#: than one of 32 (``benchmarks/NOTES.md``).
GATHER_MULTIPLE = 16


def gather_width(keep: int, channels: int, multiple: int = GATHER_MULTIPLE) -> int:
    """``keep`` rounded up to a multiple of ``multiple``, at most ``channels``: the number of
    channels per head the padded gathered forms convolve (:func:`select_kept`'s ``width``)."""
    return min(channels, -(-keep // multiple) * multiple)


def gate_from_kept(g: Tensor, index: Tensor, scale: Tensor) -> Tensor:
    """:func:`gate_dense`'s result from :func:`select_kept`'s: ``scale`` at ``index``, 0
    elsewhere (equal, ties included: both zero the candidates tied with the threshold)."""
    return scale.new_zeros(g.shape).scatter(-1, index, scale)


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
    x: Tensor,
    weight: Tensor,
    gated: Tensor,
    spec: ConvSpec,
    heads: int,
    kernels: Tensor | None = None,
) -> Tensor:
    """The reference form (``"masked"``): each head convolves its gated copy of ``x``, all in
    one ``h``-group convolution of ``h`` copies of ``x`` with :func:`head_kernels`
    (``kernels``, computed from ``weight`` when not given). The dense MACs, but no per-example
    kernel copy: on small maps the fastest exact form at batch > 1."""
    batch, cin, height, width = x.shape
    # The saliencies are float32 (or float64); the convolution runs in x's dtype.
    scale = gated.to(x.dtype)[..., None, None]
    copies = (x.unsqueeze(1) * scale).reshape(batch, heads * cin, height, width)
    if kernels is None:
        kernels = head_kernels(weight, heads)
    out = spec.conv2d(copies, kernels, None, groups=heads)
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
    # Gathered as 3-D rows and reshaped (not gathered 2-D then reshaped to 3-D): with
    # ``K * taps == positions == 1`` onnxscript's optimiser dropped the 2-D -> 3-D reshape and
    # left an invalid MatMul in the exported graph.
    picked = columns.reshape(batch * cin, taps, positions).index_select(0, rows)
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


def _strided_input(x: Tensor, spec: ConvSpec) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
    """``(x, padding, stride)`` for the gathered forms' convolution of ``x``.

    Padding other than symmetric zeros is applied here (the conv then pads nothing). A 1x1
    kernel is a per-position product, so a strided one is the stride-1 one on the subsampled
    input: it is subsampled here and runs at stride 1 (as a transposed conv, see
    :func:`runs_transposed`).
    """
    padding = zero_padding(spec)
    if padding is None:
        x, padding = spec.pad_input(x), (0, 0)
    stride = spec.stride
    if spec.kernel_size == (1, 1):
        if padding != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
            padding = (0, 0)
        if stride != (1, 1):
            x, stride = x[:, :, :: stride[0], :: stride[1]], (1, 1)
    return x, padding, stride


def _transposed_padding(spec: ConvSpec, padding: tuple[int, int]) -> tuple[int, ...]:
    return tuple(d * (k - 1) - p for d, k, p in zip(spec.dilation, spec.kernel_size, padding))


def runs_transposed(spec: ConvSpec) -> bool:
    """Whether the gathered forms run ``spec`` as a transposed convolution (stride 1, or a 1x1
    kernel, with padding within the kernel's reach): they then read the flipped kernel rows of
    :func:`kernel_rows`, gathered as they are; otherwise a plain grouped conv over the same
    rows, unflipped and reordered after the gather."""
    if spec.stride != (1, 1) and spec.kernel_size != (1, 1):
        return False
    padding = zero_padding(spec)
    padding = (0, 0) if padding is None or spec.kernel_size == (1, 1) else padding
    return min(_transposed_padding(spec, padding)) >= 0


def kernel_rows(weight: Tensor, heads: int, spec: ConvSpec) -> Tensor:
    """The kernel layout the gathered forms read: :func:`transposed_head_kernels`, flipped when
    :func:`runs_transposed`, contiguous (each kept ``(head, channel)`` is one contiguous row of
    ``Cout/h * kh * kw`` values, so a gather is a copy of whole rows)."""
    return transposed_head_kernels(weight, heads, flipped=runs_transposed(spec)).contiguous()


def _conv_gathered(
    picked: Tensor,
    kernels: Tensor,
    groups: int,
    spec: ConvSpec,
    padding: tuple[int, int],
    stride: tuple[int, int],
) -> Tensor:
    """One ``groups``-group convolution of ``picked`` ``(N, groups*K, H, W)`` with gathered
    rows ``kernels`` ``(groups*K, Cout_g, kh, kw)`` of :func:`kernel_rows`."""
    if runs_transposed(spec):
        padding = _transposed_padding(spec, padding)
        return F.conv_transpose2d(picked, kernels, None, 1, padding, 0, groups, spec.dilation)
    rows, cout_g, kh, kw = kernels.shape
    keep = rows // groups
    kernels = kernels.reshape(groups, keep, cout_g, kh, kw).transpose(1, 2)
    kernels = kernels.reshape(groups * cout_g, keep, kh, kw)
    return F.conv2d(picked, kernels, None, stride, padding, spec.dilation, groups)


def grouped_gathered_conv(
    x: Tensor,
    weight: Tensor,
    index: Tensor,
    scale: Tensor,
    spec: ConvSpec,
    heads: int,
    rows: Tensor | None = None,
) -> Tensor:
    """The sparse form as one grouped convolution with a group per example and head
    (``"batch_grouped"``).

    Same inputs and numbers as :func:`gathered_conv` (``K/Cin`` of the dense MACs), but the
    kept channels go to one ``B*h``-group convolution instead of an unfolded matmul, which is
    several times faster where the convolution library is (CPU). The kernels are gathered per
    example and head as rows of :func:`kernel_rows` (``rows``, computed from ``weight`` when
    not given): for stride 1 (and 1x1 kernels, subsampled first) they feed a transposed
    convolution as they are; otherwise they are reordered for a plain grouped conv. The
    saliency scale multiplies whichever of the gathered input and kernels is smaller. Cost
    beyond the kept MACs: one copy of the kept kernels per example (``B * K * Cout * kh * kw``
    values), which dominates on small maps. Differentiable; ``groups`` depends on the batch,
    so ``torch.export`` specialises it (use :func:`gathered_conv` to export).
    """
    x, padding, stride = _strided_input(x, spec)
    batch, cin, height, width = x.shape
    cout, _, kh, kw = weight.shape
    keep = index.shape[-1]
    groups = batch * heads
    channels = (index + torch.arange(batch, device=x.device).reshape(batch, 1, 1) * cin).reshape(-1)
    picked = x.reshape(batch * cin, height * width).index_select(0, channels)
    scale_input = height * width <= (cout // heads) * kh * kw
    if scale_input:
        picked = picked * scale.reshape(-1, 1).to(picked.dtype)
    picked = picked.reshape(1, groups * keep, height, width)
    if rows is None:
        rows = kernel_rows(weight, heads, spec)
    head_rows = index + torch.arange(heads, device=x.device).reshape(1, heads, 1) * cin
    kernels = rows.index_select(0, head_rows.reshape(-1))  # (B*h*K, Cout/h, kh, kw)
    if not scale_input:
        kernels = kernels * scale.reshape(-1, 1, 1, 1).to(kernels.dtype)
    out = _conv_gathered(picked, kernels, groups, spec, padding, stride)
    return interleave(out.reshape(batch, cout, *out.shape[2:]), heads)


def head_grouped_conv(
    x: Tensor,
    rows: Tensor,
    index: Tensor,
    scale: Tensor,
    spec: ConvSpec,
    heads: int,
    workspace: Tensor | None = None,
) -> Tensor:
    """The sparse form with the kept kernels gathered once per set of examples that keep the
    same channels (``"head_grouped"``).

    At batch 1 the selection is one static choice per head, so the layer is one ``h``-group
    convolution over the ``h*K`` gathered input channels with the kept kernel rows of
    :func:`kernel_rows` (``rows``): the kept MACs (the work of ``nn.Conv2d(h*K, Cout,
    groups=h)``) plus one gather of the kept input channels, one of the kept kernels and the
    output interleave. At larger batches, examples whose kept channels agree in every head
    (e.g. a converted layer whose saliencies do not yet depend on the input) share one
    gather of the kernels and one convolution; the saliency scale is then applied to the
    gathered input (it differs per example). With ``n`` distinct sets it runs ``n``
    convolutions (a loop on the host: the number of sets is data-dependent, so eager only
    unless the batch is 1). Same numbers as :func:`gathered_conv`; differentiable.

    ``workspace`` (batch 1, inference only: not differentiable): a tensor of the gathered
    kernels' shape ``(h*K, *rows.shape[1:])`` and dtype that the kernels are gathered into
    (and scaled in place), reused across calls: no multi-megabyte allocation per call (in
    isolation a convolution over a freshly allocated kernel measured up to 2.9x slower than
    over a reused one; inside the deployed layer the gain was within noise,
    ``benchmarks/NOTES.md``).
    """
    x, padding, stride = _strided_input(x, spec)
    batch, cin, height, width = x.shape
    keep = index.shape[-1]
    head_offsets = torch.arange(heads, device=x.device).reshape(heads, 1) * cin

    def gather_kernels(selected: Tensor) -> Tensor:
        return rows.index_select(0, (selected.reshape(heads, keep) + head_offsets).reshape(-1))

    if batch == 1:
        # x[0] may be a strided view (1x1 kernels subsample): index_select reads it as is.
        picked = x[0].index_select(0, index[0].reshape(-1)).reshape(heads * keep, -1)
        if workspace is None:
            kernels = gather_kernels(index[0])
        else:
            selected = (index[0].reshape(heads, keep) + head_offsets).reshape(-1)
            kernels = torch.index_select(rows, 0, selected, out=workspace)
        if height * width <= kernels[0].numel():
            picked = picked * scale[0].reshape(-1, 1).to(picked.dtype)
        elif workspace is None:
            kernels = kernels * scale[0].reshape(-1, 1, 1, 1).to(kernels.dtype)
        else:
            kernels.mul_(scale[0].reshape(-1, 1, 1, 1).to(kernels.dtype))
        if spec.kernel_size == (1, 1):
            # A 1x1 kernel is a matrix product per head: (Cout/h, K) x (K, H*W); the gathered
            # rows (K, Cout/h) read transposed (no reordering copy, no transposed conv).
            per_head = kernels.reshape(heads, keep, -1).transpose(1, 2)
            out = torch.bmm(per_head, picked.reshape(heads, keep, height * width))
            return interleave(out.reshape(1, -1, height, width), heads)
        picked = picked.reshape(1, heads * keep, height, width)
        return interleave(_conv_gathered(picked, kernels, heads, spec, padding, stride), heads)
    sets, which = torch.unique(index.reshape(batch, heads * keep), dim=0, return_inverse=True)
    parts, members_of = [], []
    for number in range(sets.shape[0]):
        members = (which == number).nonzero().reshape(-1)
        channels = sets[number]
        flat = (members.reshape(-1, 1) * cin + channels.reshape(1, -1)).reshape(-1)
        picked = x.reshape(batch * cin, height * width).index_select(0, flat)
        picked = picked * scale.index_select(0, members).reshape(-1, 1).to(picked.dtype)
        picked = picked.reshape(members.shape[0], heads * keep, height, width)
        kernels = gather_kernels(channels)
        parts.append(_conv_gathered(picked, kernels, heads, spec, padding, stride))
        members_of.append(members)
    order = torch.cat(members_of).argsort()
    return interleave(torch.cat(parts).index_select(0, order), heads)


def block_rows(weight: Tensor, heads: int, block: int) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` as rows ``(h*Cin, Cout/h/block, kh, kw, block)``,
    contiguous: row ``i*Cin + c`` holds input channel ``c`` of head ``i`` (not flipped), its
    head's output channels (``j*h + i``) split into blocks of ``block``, the block innermost
    (:func:`head_blocked_conv`)."""
    cout, cin, kh, kw = weight.shape
    per_head = weight.reshape(cout // heads // block, block, heads, cin, kh, kw)
    return per_head.permute(2, 3, 0, 4, 5, 1).reshape(heads * cin, -1, kh, kw, block).contiguous()


def head_blocked_conv(
    x: Tensor, rows: Tensor, index: Tensor, scale: Tensor, spec: ConvSpec, heads: int
) -> Tensor:
    """``"head_grouped"`` at batch 1 as one ``h``-group convolution whose kernel is computed by
    one permutation of the gathered rows of :func:`block_rows` (``rows``). Exported, that
    permutation composed with the reorder into onnxruntime's blocked ``OIHWBiBo`` layout is
    one ``Transpose`` that writes the blocked kernel
    (:func:`dynaconv.onnxruntime_nchwc.rewrite_computed_convs`): a row gather and one
    reordering copy. ``index``/``scale`` ``(1, h, W)`` with ``W`` and ``Cout/h`` multiples of
    the rows' block. Same numbers as :func:`head_grouped_conv`.

    (Gathering the blocked kernel directly, as rows of ``block`` values from a
    ``(h, Cout/h/b, Cin, kh*kw, b)`` bank, needs no reordering copy but measured 2-3x slower
    in onnxruntime: its ``Gather`` pays per index, ``benchmarks/NOTES.md``.)"""
    x, padding, stride = _strided_input(x, spec)
    cin, height, width = x.shape[1:]
    keep = index.shape[-1]
    _, out_blocks, kh, kw, block = rows.shape
    selected = (index[0] + torch.arange(heads, device=x.device).reshape(heads, 1) * cin).reshape(-1)
    picked = x[0].index_select(0, index[0].reshape(-1))
    kernels = rows.index_select(0, selected)  # (h*W, Cout/h/b, kh, kw, b)
    if height * width <= kernels[0].numel():
        picked = picked * scale[0].reshape(-1, 1, 1).to(picked.dtype)
    else:
        kernels = kernels * scale[0].reshape(-1, 1, 1, 1, 1).to(kernels.dtype)
    # (h, W/b, b_in, Cout/h/b, kh, kw, b_out) -> (h, Cout/h/b, b_out, W/b, b_in, kh, kw)
    kernels = kernels.reshape(heads, keep // block, block, out_blocks, kh, kw, block)
    kernels = kernels.permute(0, 3, 6, 1, 2, 4, 5).reshape(-1, keep, kh, kw)
    out = F.conv2d(picked.unsqueeze(0), kernels, None, stride, padding, spec.dilation, heads)
    return interleave(out, heads)


def tap_rows(weight: Tensor, heads: int) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` as rows ``(h*Cin, kh*kw*Cout/h)``, contiguous: row
    ``i*Cin + c`` holds input channel ``c`` of head ``i``, tap-major (``[t, o]``). The ``K``
    gathered rows of a head, read as ``(K*kh*kw, Cout/h)``, are the transposed matrix of the
    head's im2col product (:func:`head_gemm_single`)."""
    cout, cin, kh, kw = weight.shape
    per_head = weight.reshape(cout // heads, heads, cin, kh * kw).permute(1, 2, 3, 0)
    return per_head.contiguous().reshape(heads * cin, kh * kw * (cout // heads))


def head_gemm_single(
    x: Tensor,
    rows: Tensor,
    index: Tensor,
    scale: Tensor,
    spec: ConvSpec,
    heads: int,
    workspace: Tensor | None = None,
) -> Tensor:
    """``"head_grouped"`` at batch 1 as one batched matrix product (small output maps).

    ``x`` ``(1, Cin, H, W)``, ``rows`` :func:`tap_rows`, ``index``/``scale`` ``(1, h, K)``.
    Per head ``i``: the gathered rows ``R_i`` ``(K*kh*kw, Cout/h)`` and the im2col columns
    ``X_i`` ``(K*kh*kw, P)`` of the gathered, scaled input channels; ``out_i = R_i^T X_i``
    (computed transposed, ``X_i^T R_i``: no reordering copy of ``R_i``). The kept MACs, the kept
    kernels read once by the gather and once by the product, and no convolution weight
    reorder: on 4x4 maps it measured faster than the grouped convolution
    (``benchmarks/NOTES.md``). ``workspace``: a reused tensor of the gathered rows' shape.
    """
    padding = zero_padding(spec)
    if padding is None:
        x, padding = spec.pad_input(x), (0, 0)
    cin, height, width = x.shape[1:]
    keep = index.shape[-1]
    out_h, out_w = conv_output_sizes(spec, height, width, padding)
    selected = (index[0] + torch.arange(heads, device=x.device).reshape(heads, 1) * cin).reshape(-1)
    picked = x[0].index_select(0, index[0].reshape(-1))
    picked = picked * scale[0].reshape(-1, 1, 1).to(picked.dtype)
    columns = F.unfold(picked.unsqueeze(0), spec.kernel_size, spec.dilation, padding, spec.stride)
    columns = columns.reshape(heads, keep * spec.kernel_numel, out_h * out_w)
    if workspace is None:
        kernels = rows.index_select(0, selected)
    else:
        kernels = torch.index_select(rows, 0, selected, out=workspace)
    kernels = kernels.reshape(heads, keep * spec.kernel_numel, -1)
    # out_i^T = X_i^T R_i: (P, Cout/h) per head, the gathered rows read as stored (faster
    # than R_i^T X_i here: 0.46x against 0.56x of the dense conv at 512 channels on 4x4);
    # [i, p, j] -> [j, i, p] is the interleaved channel order j*h + i in one copy.
    out = torch.bmm(columns.transpose(1, 2), kernels)
    return out.permute(2, 0, 1).reshape(1, -1, out_h, out_w)


def conv_output_sizes(
    spec: ConvSpec, height: int, width: int, padding: tuple[int, int]
) -> tuple[int, int]:
    """The output map of ``spec``'s kernel, stride and dilation on a ``height x width`` input
    padded by ``padding`` on each side."""
    sizes = []
    for size, kernel, stride, pad, dilation in zip(
        (height, width), spec.kernel_size, spec.stride, padding, spec.dilation
    ):
        sizes.append((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
    return sizes[0], sizes[1]


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


def zero_padding(spec: ConvSpec) -> tuple[int, int] | None:
    """The symmetric zero padding of ``spec``, or None (other modes, asymmetric 'same')."""
    if spec.pads_explicitly:
        return None
    left, right, top, bottom = spec.explicit_padding()
    if left != right or top != bottom:
        return None
    return (top, left)
