"""Fused gathered-channel convolution for dynamic group convolution (inference).

For every example ``b`` and head ``i`` the layer keeps ``K`` input channels ``idx[b, i, :]``
with scales ``s[b, i, :]``. This kernel computes, as one implicit GEMM per
``(b, i, output-channel tile, output-pixel tile)``::

    out[b, j*h + i, p] = sum_{k < K} sum_{taps} W_i[j, idx[b,i,k], tap] * s[b,i,k]
                                                * x[b, idx[b,i,k], p*stride - pad + tap*dilation]

loading only the kept channels of ``x`` (zero padding by masks) and the matching kernel
columns, accumulating with ``tl.dot`` in float32, and writing head ``i``'s outputs straight
into the interleaved channels ``j*h + i``. ``gate_factor`` of the dense MACs, no gathered copy
of the input in memory.

Kernel weights are read in the layout ``(h, kh, kw, Cin, Cout/h)`` (contiguous along the
output channels), see :func:`dynaconv.layers.dgc.functional.triton_kernel_layout`.

Also here: :func:`sparse_conv_triton` (the layer's inference call: top-k straight into the
kernel) and :class:`GatedHeadsConv` (the training form: this kernel forward, a backward in
cuDNN convolutions head by head).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ...dispatch import interpreting
from ...kernels import autotune_configs
from .functional import top_candidates, triton_kernel_layout, zero_padding

if TYPE_CHECKING:
    from ...spec import ConvSpec

__all__ = ["GatedHeadsConv", "gathered_conv_triton", "sparse_conv_triton"]


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gathered_conv_kernel(
        x_ptr,
        w_ptr,
        idx_ptr,
        s_ptr,
        out_ptr,
        CIN,
        H,
        W,
        WO,
        P,
        COUT_H,
        K,
        idx_row,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        HEADS: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        BLOCK_CO: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ACC_F64: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr,
    ):
        acc_dtype = tl.float64 if ACC_F64 else tl.float32
        pid_bh = tl.program_id(0)
        pid_co = tl.program_id(1)
        pid_p = tl.program_id(2)
        b = (pid_bh // HEADS).to(tl.int64)
        head = pid_bh % HEADS
        co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        co_ok = co < COUT_H
        p_ok = p < P
        oh = p // WO
        ow = p % WO
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=acc_dtype)
        row_base = pid_bh.to(tl.int64) * idx_row
        if HAS_THRESHOLD:  # the value after the K kept ones: zero every kept value <= it
            threshold = tl.load(s_ptr + row_base + K).to(acc_dtype)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            ch = tl.load(idx_ptr + row_base + kk, mask=k_ok, other=0).to(tl.int64)
            sc = tl.load(s_ptr + row_base + kk, mask=k_ok, other=0.0).to(acc_dtype)
            if HAS_THRESHOLD:
                sc = tl.where(sc <= threshold, 0.0, sc)
            x_rows = (b * CIN + ch) * H
            for dh in tl.static_range(KH):
                ih = oh * stride_h - pad_h + dh * dil_h
                h_ok = (ih >= 0) & (ih < H)
                for dw in tl.static_range(KW):
                    iw = ow * stride_w - pad_w + dw * dil_w
                    pix_ok = p_ok & h_ok & (iw >= 0) & (iw < W)
                    x_tile = tl.load(
                        x_ptr + (x_rows[:, None] + ih[None, :]) * W + iw[None, :],
                        mask=k_ok[:, None] & pix_ok[None, :],
                        other=0.0,
                    )
                    tap = (head * KH + dh) * KW + dw
                    w_tile = tl.load(
                        w_ptr + (tap * CIN + ch[None, :]) * COUT_H + co[:, None],
                        mask=co_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    w_tile = (w_tile.to(acc_dtype) * sc[None, :]).to(x_tile.dtype)
                    acc += tl.dot(w_tile, x_tile)
        out_channel = co * HEADS + head
        out_ptrs = out_ptr + (b * (COUT_H * HEADS) + out_channel[:, None]) * P + p[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=co_ok[:, None] & p_ok[None, :])

    configs = [
        triton.Config({"BLOCK_CO": co, "BLOCK_P": bp, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for co, bp, bk, w, s in [
            (64, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (32, 64, 32, 4, 3),
            (64, 64, 16, 4, 4),
            (32, 128, 16, 4, 3),
            (16, 128, 32, 4, 3),
            (64, 256, 32, 8, 3),
            (16, 128, 16, 4, 3),
            (16, 256, 16, 4, 3),
            (32, 128, 32, 4, 4),
            (128, 64, 32, 8, 3),
        ]
    ]
    tuned = triton.autotune(
        configs=autotune_configs(configs), key=["CIN", "COUT_H", "K", "P", "KH", "KW"]
    )(gathered_conv_kernel)
    return gathered_conv_kernel, tuned, triton


def gathered_conv_triton(
    x: Tensor,
    kernel_weight: Tensor,
    index: Tensor,
    scale: Tensor,
    heads: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    keep: int | None = None,
) -> Tensor:
    """The gathered-channel convolution (zero padding ``padding``), output interleaved.

    ``x`` ``(B, Cin, H, W)``; ``kernel_weight`` ``(h, kh, kw, Cin, Cout/h)``; ``index``,
    ``scale`` ``(B, h, L)``: the first ``keep`` (default ``L``) entries of each row are the
    kept channels and their scales. With ``keep = L - 1`` the last entry of each ``scale`` row
    is a threshold: kept scales ``<=`` it count as 0 (the reference's tie rule), so top-k
    outputs go in unchanged. Returns ``(B, Cout, H', W')`` in ``x``'s dtype.
    """
    plain, tuned, triton = _kernels()
    x = x.contiguous()
    batch, cin, height, width = x.shape
    _, kh, kw, _, cout_h = kernel_weight.shape
    row = index.shape[-1]
    keep = row if keep is None else keep
    if keep not in (row, row - 1):
        raise ValueError(f"keep must be {row} or {row - 1} for rows of {row}, got {keep}")
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    positions = out_h * out_w
    out = torch.empty(batch, cout_h * heads, out_h, out_w, device=x.device, dtype=x.dtype)
    weight = kernel_weight.to(x.dtype).contiguous()
    index = index.contiguous()  # top-k outputs already are: no copy
    wide = x.dtype == torch.float64
    scale = scale.to(torch.float64 if wide else torch.float32).contiguous()
    args = (x, weight, index, scale, out, cin, height, width, out_w, positions, cout_h, keep, row)
    args += (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    flags = {"HEADS": heads, "KH": kh, "KW": kw, "ACC_F64": wide, "HAS_THRESHOLD": keep < row}
    if interpreting():  # one fixed configuration: the interpreter is slow
        grid = (batch * heads, triton.cdiv(cout_h, 16), triton.cdiv(positions, 16))
        plain[grid](*args, BLOCK_CO=16, BLOCK_P=16, BLOCK_K=16, **flags)
    else:

        def grid(meta):
            return (
                batch * heads,
                triton.cdiv(cout_h, meta["BLOCK_CO"]),
                triton.cdiv(positions, meta["BLOCK_P"]),
            )

        tuned[grid](*args, **flags)
    return out


def sparse_conv_triton(
    x: Tensor,
    kernel_weight: Tensor,
    g: Tensor,
    inactive: int,
    spec: ConvSpec,
    heads: int,
) -> Tensor:
    """DGC's sparse form through :func:`gathered_conv_triton`: saliencies ``g`` ``(B, h,
    Cin)`` with ``inactive`` channels dropped per example and head (the tie rule applied in
    the kernel); ``kernel_weight`` in :func:`triton_kernel_layout`. Other padding modes (and
    asymmetric 'same') pad explicitly first."""
    if spec.padding_mode != "zeros" or spec.padding == "same":
        x = spec.pad_input(x)
        pad = (0, 0)
    else:
        pad = spec.padding  # type: ignore[assignment]
    index, values, keep = top_candidates(g, inactive)
    return gathered_conv_triton(
        x, kernel_weight, index, values, heads, spec.stride, pad, spec.dilation, keep
    )


class GatedHeadsConv(torch.autograd.Function):
    """Training form of the sparse path: the fused Triton kernel forward (``K/Cin`` of the
    MACs, no gated copies of ``x``), a backward in cuDNN convolutions head by head over
    ``chunks`` batch chunks (the transient gated input and its gradient are ``1/chunks`` of
    ``x`` each).

    Inputs: ``x`` ``(B, Cin, H, W)``, ``gated`` ``(B, h, Cin)`` (the zeroed saliencies),
    ``weight`` ``(Cout, Cin, kh, kw)``, ``index`` ``(B, h, K)`` (kept channels).
    """

    @staticmethod
    def forward(ctx, x, gated, weight, index, spec, heads, use_triton, chunks=2):  # type: ignore[override]
        padding = zero_padding(spec)
        ctx.conv_args = (spec.stride, padding, spec.dilation)
        ctx.heads = heads
        ctx.chunks = chunks
        ctx.save_for_backward(x, gated, weight)
        if use_triton:
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
