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
output channels), see :func:`dynaconv.layers.dgc.triton_kernel_layout`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..dispatch import interpreting
from . import autotune_configs

__all__ = ["gathered_conv_triton"]


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
