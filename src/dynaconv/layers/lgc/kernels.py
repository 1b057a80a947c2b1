"""Fused Triton kernel of the deployed learned group convolution (CondenseNet's index layer).

One pass computes, for a 1x1 stride-1
:class:`~dynaconv.layers.lgc.deployed.CondensedGroupConv2d` (given as its tensors and
:class:`~dynaconv.spec.ConvSpec`: :func:`condensed_conv`),

``y[b, out(g, n), s] = post(sum_k W[g * N + n, k] * pre(x[b, index[g * K + k], s]))``

* ``x`` ``(B, Cin, H, W)`` is read through ``index`` (no gathered copy), any batch and channel
  strides (so a channel slice of a larger buffer is read in place), spatial dims contiguous;
* ``pre`` is the folded BN-ReLU of the gathered channels, ``post`` the folded BN-ReLU after the
  layer (per output channel), both optional;
* ``out(g, n)`` is ``n * G + g`` (interleaved, the LGC's own order: the channel shuffle costs
  nothing) or ``g * N + n`` (group-major);
* every program computes a ``(BLOCK_N, BLOCK_P)`` tile of one group's outputs over flattened
  positions ``b * H * W + s`` with ``tl.dot`` (float32 products in full precision unless
  ``torch.backends.cuda.matmul.allow_tf32`` is set, then TF32; fp32 accumulation).

The kernel is exposed as the custom op ``dynaconv::lgc_condensed_conv1x1`` so that
``torch.compile`` and ``torch.export`` keep it as one node.
"""

import functools
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from ...dispatch import interpreting, triton_available, triton_usable
from ...kernels import autotune_configs
from ...spec import ConvSpec

__all__ = [
    "ChannelAffine",
    "condensed_conv",
    "condensed_conv1x1",
    "pointwise_geometry",
    "supports",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def lgc_kernel(
        x_ptr,
        idx_ptr,
        w_ptr,
        bias_ptr,
        in_scale_ptr,
        in_shift_ptr,
        out_scale_ptr,
        out_shift_ptr,
        y_ptr,
        P,
        HW,
        K,
        N,
        G,
        stride_xb,
        stride_xc,
        stride_yb,
        stride_yc,
        HAS_BIAS: tl.constexpr,
        HAS_PRE: tl.constexpr,
        PRE_RELU: tl.constexpr,
        HAS_POST: tl.constexpr,
        POST_RELU: tl.constexpr,
        INTERLEAVE: tl.constexpr,
        DOT_IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        pid_gn = tl.program_id(1)
        n_blocks = tl.cdiv(N, BLOCK_N)
        g = pid_gn // n_blocks
        offs_n = (pid_gn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        batch = (offs_p // HW).to(tl.int64)
        spatial = offs_p % HW
        x_pos = batch * stride_xb + spatial
        acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            channel = tl.load(idx_ptr + g * K + offs_k, mask=k_mask, other=0).to(tl.int64)
            tile_mask = k_mask[:, None] & p_mask[None, :]
            xt = tl.load(
                x_ptr + channel[:, None] * stride_xc + x_pos[None, :], mask=tile_mask, other=0.0
            ).to(tl.float32)
            if HAS_PRE:
                scale = tl.load(in_scale_ptr + g * K + offs_k, mask=k_mask, other=0.0)
                shift = tl.load(in_shift_ptr + g * K + offs_k, mask=k_mask, other=0.0)
                xt = xt * scale.to(tl.float32)[:, None] + shift.to(tl.float32)[:, None]
                if PRE_RELU:
                    xt = tl.maximum(xt, 0.0)
                xt = tl.where(tile_mask, xt, 0.0)
            w = tl.load(
                w_ptr + (g * N + offs_n)[:, None] * K + offs_k[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if DOT_IEEE:
                acc += tl.dot(w, xt.to(w.dtype), input_precision="ieee")
            else:
                acc += tl.dot(w, xt.to(w.dtype))
        if HAS_BIAS:
            bias = tl.load(bias_ptr + g * N + offs_n, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[:, None]
        if INTERLEAVE:  # noqa: SIM108 (a constexpr branch, kept explicit for Triton)
            out_channel = offs_n * G + g
        else:
            out_channel = g * N + offs_n
        if HAS_POST:
            scale = tl.load(out_scale_ptr + out_channel, mask=n_mask, other=0.0)
            shift = tl.load(out_shift_ptr + out_channel, mask=n_mask, other=0.0)
            acc = acc * scale.to(tl.float32)[:, None] + shift.to(tl.float32)[:, None]
            if POST_RELU:
                acc = tl.maximum(acc, 0.0)
        y_ptrs = (
            y_ptr
            + batch[None, :] * stride_yb
            + out_channel.to(tl.int64)[:, None] * stride_yc
            + spatial[None, :]
        )
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & p_mask[None, :])

    configs = [
        triton.Config({"BLOCK_P": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 128, "BLOCK_K": 16}, num_warps=4, num_stages=4),
    ]
    tuned = triton.autotune(
        configs=autotune_configs(configs), key=["P", "K", "N", "HAS_PRE", "HAS_POST", "DOT_IEEE"]
    )(lgc_kernel)
    return lgc_kernel, tuned


def _block_n(n: int) -> int:
    block = 16
    while block < n and block < 128:
        block *= 2
    return block


@torch.library.custom_op("dynaconv::lgc_condensed_conv1x1", mutates_args=())
def condensed_conv1x1(
    x: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045 (the op schema parser's spelling)
    in_scale: Optional[Tensor],  # noqa: UP045 (the op schema parser's spelling)
    in_shift: Optional[Tensor],  # noqa: UP045 (the op schema parser's spelling)
    in_relu: bool,
    out_scale: Optional[Tensor],  # noqa: UP045 (the op schema parser's spelling)
    out_shift: Optional[Tensor],  # noqa: UP045 (the op schema parser's spelling)
    out_relu: bool,
    groups: int,
    interleave: bool,
) -> Tensor:
    """The fused gather + BN-ReLU + grouped 1x1 conv (+ BN-ReLU), see the module docstring."""
    import triton

    batch, _, height, width = x.shape
    if x.stride(3) != 1 or x.stride(2) != width:
        x = x.contiguous()
    cout, per_group = weight.shape[:2]
    n = cout // groups
    y = torch.empty(batch, cout, height, width, device=x.device, dtype=x.dtype)
    positions = batch * height * width
    if positions == 0:
        return y
    plain, tuned = _kernels()
    weight = weight.reshape(cout, per_group).contiguous()
    index = index.to(torch.int32).contiguous()
    dummy = weight
    args = (
        x,
        index,
        weight,
        dummy if bias is None else bias.contiguous(),
        dummy if in_scale is None else in_scale.contiguous(),
        dummy if in_shift is None else in_shift.contiguous(),
        dummy if out_scale is None else out_scale.contiguous(),
        dummy if out_shift is None else out_shift.contiguous(),
        y,
        positions,
        height * width,
        per_group,
        n,
        groups,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_PRE": in_scale is not None,
        "PRE_RELU": bool(in_relu),
        "HAS_POST": out_scale is not None,
        "POST_RELU": bool(out_relu),
        "INTERLEAVE": bool(interleave),
        # float32: full precision unless PyTorch's matmuls may use TF32 (the kernel is
        # memory-bound, so exact products cost little)
        "DOT_IEEE": x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        "BLOCK_N": _block_n(n),
    }
    n_blocks = triton.cdiv(n, flags["BLOCK_N"])
    if interpreting():
        block_p = 16
        grid = (triton.cdiv(positions, block_p), groups * n_blocks)
        plain[grid](*args, **flags, BLOCK_P=block_p, BLOCK_K=16)
    else:
        tuned[lambda meta: (triton.cdiv(positions, meta["BLOCK_P"]), groups * n_blocks)](
            *args, **flags
        )
    return y


@condensed_conv1x1.register_fake
def _(x, index, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, out_relu, groups, interleave):  # fmt: skip
    batch, _, height, width = x.shape
    return x.new_empty(batch, weight.shape[0], height, width)


def pointwise_geometry(spec: ConvSpec) -> bool:
    """Whether ``spec`` is the geometry the fused kernel computes: a 1x1, stride-1, unpadded
    convolution (``"same"`` padding is none at that size)."""
    return (
        spec.kernel_size == (1, 1)
        and spec.stride == (1, 1)
        and spec.padding in ((0, 0), "same", "valid")
    )


def supports(spec: ConvSpec, weight: Tensor, x: Tensor) -> bool:
    """Whether the fused kernel can run the conv of geometry ``spec`` and kernel ``weight``
    ``(Cout, K, 1, 1)`` on ``x`` here (Triton usable on ``x``'s device, a supported dtype
    shared by ``x`` and ``weight``, :func:`pointwise_geometry`)."""
    return (
        triton_available()
        and triton_usable(x)
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and pointwise_geometry(spec)
    )


class ChannelAffine(NamedTuple):
    """A folded per-channel BatchNorm (and ReLU): ``v -> relu?(v * scale + shift)``."""

    scale: Tensor
    shift: Tensor
    relu: bool = False


_NO_AFFINE = (None, None, False)


def condensed_conv(
    spec: ConvSpec,
    x: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    interleave: bool,
    pre: ChannelAffine | None = None,
    post: ChannelAffine | None = None,
) -> Tensor:
    """The deployed LGC's conv through the fused kernel: ``x`` ``(B, Cin, H, W)`` gathered by
    ``index`` ``(groups * K,)``, ``pre`` (per gathered channel), the grouped 1x1 conv
    ``weight`` ``(Cout, K, 1, 1)`` (+ ``bias``), outputs in the order ``interleave`` names
    (see the module docstring), ``post`` (per output channel): ``(B, Cout, H, W)``.
    ``ValueError`` unless ``spec`` is a 1x1, stride-1, unpadded conv
    (:func:`pointwise_geometry`)."""
    if not pointwise_geometry(spec):
        raise ValueError(
            "the fused LGC kernel needs a 1x1, stride-1, unpadded conv, got kernel_size="
            f"{spec.kernel_size}, stride={spec.stride}, padding={spec.padding}"
        )
    in_scale, in_shift, in_relu = _NO_AFFINE if pre is None else pre
    out_scale, out_shift, out_relu = _NO_AFFINE if post is None else post
    return condensed_conv1x1(
        x, index, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, out_relu,
        groups, interleave,
    )  # fmt: skip
