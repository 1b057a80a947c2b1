"""Fused Triton kernel for CondConv (:class:`dynaconv.layers.condconv.CondConv2d`).

One implicit-GEMM convolution per example. For example ``b`` the output tile
``y[b, co_tile, p_tile]`` (output channels x output positions) accumulates, over the reduction
index ``k = (ci, kh, kw)`` of the group (``Cin/groups * kh * kw`` values, the kernel's own
contiguous order), ``W_b[co_tile, k_tile] @ X_b[k_tile, p_tile]`` with ``tl.dot``, where the
input tile is gathered on the fly from ``x`` (zero padding by masking, any stride and
dilation) and the kernel tile is either

* **mixed in registers**: ``sum_e r[b, e] * W_e[co_tile, k_tile]`` from the ``E`` expert tiles
  (``W_b`` is never written to memory), used when an example's output fits in a few position
  tiles (the mixing is repeated once per position tile), or
* **premixed**: read from ``W = mix(r, W_e)`` ``(B, Cout, Cin/groups, kh, kw)`` computed
  beforehand with one matrix product (cheap when the output has many positions).

When it mixes in registers and no routing weights are given, each program also computes its
example's routing ``r = sigmoid(fc(GAP(x[b])))`` from ``x`` before the main loop (the pooling
is repeated by the programs of one example, cheap next to the GEMM), so an inference forward
of the layer is a single kernel launch.

Grid: ``(position tiles, groups * output-channel tiles, B)``. Block sizes come from
``triton.autotune`` over a few configurations per variant (keyed by the shape), chosen by
compiling for sm_90 and checking registers, spills and shared memory. fp32 inputs use TF32 in
``tl.dot`` when ``torch.backends.cudnn.allow_tf32`` is set (as PyTorch's own convs do), exact
fp32 otherwise. The backward pass (when gradients are needed) recomputes the batch-folded
form with autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...dispatch import interpreting
from ...kernels import autotune_configs
from .functional import condconv2d_torch, mix

__all__ = ["condconv_triton", "premix_default"]


@triton.jit
def _condconv_kernel(
    x_ptr,
    w_ptr,
    r_ptr,
    bias_ptr,
    fc_w_ptr,
    fc_b_ptr,
    y_ptr,
    H,
    W,
    OW,
    P,
    CIN_G,
    COUT_G,
    CIN,
    sxb,
    sxc,
    sxh,
    sxw,
    swb,
    swe,
    swo,
    sbb,
    syb,
    syc,
    syh,
    syw,
    E: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    E_PAD: tl.constexpr,
    MIX: tl.constexpr,
    ROUTE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL_E: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    co_tiles = tl.cdiv(COUT_G, BLOCK_CO)
    group = pid_co // co_tiles
    co = (pid_co % co_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < COUT_G
    co_global = group * COUT_G + co
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    ih0 = (p // OW) * SH - PH
    iw0 = (p % OW) * SW - PW
    k_total = CIN_G * KH * KW
    w_rows = w_ptr + b * swb + co_global[:, None] * swo
    x_base = x_ptr + b * sxb + (group * CIN_G) * sxc
    e_idx = tl.arange(0, E_PAD)
    if ROUTE:
        r_vec = _routing(
            x_ptr + b * sxb,
            fc_w_ptr,
            fc_b_ptr,
            H,
            W,
            CIN,
            sxc,
            sxh,
            sxw,
            E,
            E_PAD,
            BLOCK_K,
            BLOCK_P,
        )
    else:
        r_vec = tl.load(r_ptr + b * E + e_idx, mask=e_idx < E, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_total
        ci = k // (KH * KW)
        tap = k % (KH * KW)
        ih = ih0[None, :] + (tap // KW)[:, None] * DH
        iw = iw0[None, :] + (tap % KW)[:, None] * DW
        x_mask = k_mask[:, None] & p_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + ci[:, None] * sxc + ih * sxh + iw * sxw, mask=x_mask, other=0.0)
        w_mask = co_mask[:, None] & k_mask[None, :]
        if MIX:
            w_tile = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
            if UNROLL_E:  # all expert loads in flight at once (more registers)
                for e in tl.static_range(E):
                    r_e = tl.sum(tl.where(e_idx == e, r_vec, 0.0), axis=0)
                    expert = tl.load(w_rows + e * swe + k[None, :], mask=w_mask, other=0.0)
                    w_tile += r_e * expert.to(tl.float32)
            else:
                for e in range(E):
                    r_e = tl.sum(tl.where(e_idx == e, r_vec, 0.0), axis=0)
                    expert = tl.load(w_rows + e * swe + k[None, :], mask=w_mask, other=0.0)
                    w_tile += r_e * expert.to(tl.float32)
        else:
            w_tile = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(
            w_tile.to(x_tile.dtype), x_tile, input_precision=INPUT_PRECISION, out_dtype=tl.float32
        )
    if HAS_BIAS:
        if MIX:  # the bias bank (E, Cout), mixed here
            bias = tl.zeros((BLOCK_CO,), dtype=tl.float32)
            for e in range(E):
                r_e = tl.sum(tl.where(e_idx == e, r_vec, 0.0), axis=0)
                expert_bias = tl.load(bias_ptr + e * sbb + co_global, mask=co_mask, other=0.0)
                bias += r_e * expert_bias.to(tl.float32)
        else:  # premixed (B, Cout)
            bias = tl.load(bias_ptr + b * sbb + co_global, mask=co_mask, other=0.0)
        acc += bias.to(tl.float32)[:, None]
    oh = p // OW
    ow = p % OW
    y_offsets = b * syb + co_global[:, None] * syc + (oh * syh + ow * syw)[None, :]
    tl.store(
        y_ptr + y_offsets,
        acc.to(y_ptr.dtype.element_ty),
        mask=co_mask[:, None] & p_mask[None, :],
    )


@triton.jit
def _routing(
    x_ptr,
    fc_w_ptr,
    fc_b_ptr,
    H,
    W,
    CIN,
    sxc,
    sxh,
    sxw,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    # sigmoid(fc_w @ mean_hw(x) + fc_b) for one example x (CIN, H, W): (E_PAD,) routing weights.
    e_idx = tl.arange(0, E_PAD)
    e_mask = e_idx < E
    logits = tl.zeros((E_PAD,), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < CIN
        pooled = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for hw0 in range(0, H * W, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            offsets = c[:, None] * sxc + ((hw // W) * sxh + (hw % W) * sxw)[None, :]
            mask = c_mask[:, None] & (hw < H * W)[None, :]
            pooled += tl.sum(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), axis=1)
        fc_w = tl.load(
            fc_w_ptr + e_idx[:, None] * CIN + c[None, :],
            mask=e_mask[:, None] & c_mask[None, :],
            other=0.0,
        )
        logits += tl.sum(fc_w.to(tl.float32) * pooled[None, :], axis=1)
    fc_b = tl.load(fc_b_ptr + e_idx, mask=e_mask, other=0.0).to(tl.float32)
    return tl.sigmoid(logits / (H * W) + fc_b)


def _config(co: int, p: int, k: int, warps: int, stages: int, unroll: bool = False):
    block = {"BLOCK_CO": co, "BLOCK_P": p, "BLOCK_K": k, "UNROLL_E": unroll}
    return triton.Config(block, num_warps=warps, num_stages=stages)


# Chosen by compiling for sm_90 (registers, spills, shared memory with E = 8): mixing in
# registers pipelines the E expert tiles through shared memory when unrolled, so it takes
# BLOCK_K = 16 and 2 stages; the premixed kernel is a plain implicit GEMM.
_MIX_CONFIGS = [
    _config(64, 128, 16, 4, 2, unroll=True),
    _config(128, 128, 16, 8, 2, unroll=True),
    _config(64, 256, 16, 8, 2, unroll=True),
    _config(64, 128, 16, 4, 2),
    _config(64, 256, 16, 8, 2),
    _config(128, 256, 16, 8, 2),
]
_PREMIX_CONFIGS = [
    _config(64, 128, 32, 4, 3),
    _config(128, 64, 32, 4, 3),
    _config(128, 128, 32, 8, 3),
    _config(64, 256, 32, 8, 3),
    _config(128, 256, 16, 8, 2),
    _config(256, 128, 16, 8, 2),
]
_KEY = ["CIN_G", "COUT_G", "P", "E", "KH", "KW", "SH", "SW", "ROUTE"]
_mix_kernel = triton.autotune(configs=autotune_configs(_MIX_CONFIGS), key=_KEY)(_condconv_kernel)
_premix_kernel = triton.autotune(configs=autotune_configs(_PREMIX_CONFIGS), key=_KEY)(
    _condconv_kernel
)

#: Block sizes in Triton's interpreter (CPU tests): the smallest that ``tl.dot`` accepts.
_INTERPRETER_BLOCKS = {"BLOCK_CO": 16, "BLOCK_P": 16, "BLOCK_K": 16, "UNROLL_E": False}


def premix_default(positions: int) -> bool:
    """Premix the kernels when an example has many output positions (> 512).

    Mixing in registers is repeated for every position tile of an example (``E`` multiply-adds
    per kernel element per tile, on the vector units, and ``E`` expert tiles loaded from L2);
    premixing costs one write and read of ``B * numel(W_e)`` values instead, which is cheaper
    once there are more than a few tiles.
    """
    return positions > 512


def _launch(
    spec,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    r: Tensor | None,
    premix: bool | None,
    routing: tuple[Tensor, Tensor] | None = None,
    blocks: dict | None = None,
) -> Tensor:
    if spec.pads_explicitly:  # other padding modes, TensorFlow's SAME
        x = spec.pad_input(x)
        left = top = 0
        out_h, out_w = (
            (size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(x.shape[2:], spec.kernel_size, spec.stride, spec.dilation)
        )
    else:
        left, _, top, _ = spec.explicit_padding()
        out_h, out_w = spec.output_size(x.shape[2], x.shape[3])
    batch, _, height, width = x.shape
    experts = weight.shape[0]
    positions = out_h * out_w
    if premix is None:
        premix = premix_default(positions)
    route = r is None  # (only with zero padding: x is the unpadded input here)
    if route and premix:  # the mixed kernels need r first
        r = torch.sigmoid(torch.nn.functional.linear(x.mean(dim=(2, 3)), *routing))
        route = False
    cout, groups = spec.out_channels, spec.groups
    if premix:
        kernels = mix(r, weight).contiguous()
        w_strides = (kernels[0].numel(), 0, kernels[0, 0].numel())
        bias_arg = None if bias is None else (r @ bias).contiguous()
    else:
        kernels = weight.contiguous()
        w_strides = (0, kernels[0].numel(), kernels[0, 0].numel())
        bias_arg = None if bias is None else bias.contiguous()
    y = torch.empty(batch, cout, out_h, out_w, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    # "ieee" only matters (and is only passed) for fp32 with TF32 disabled, as in PyTorch's convs.
    ieee = x.dtype == torch.float32 and (not torch.backends.cudnn.allow_tf32 or interpreting())
    fc_weight, fc_bias = routing if route else (y, y)
    args = (
        x,
        kernels,
        y if route else r.contiguous(),
        y if bias_arg is None else bias_arg,
        fc_weight,
        fc_bias,
        y,
        height,
        width,
        out_w,
        positions,
        spec.in_channels // groups,
        cout // groups,
        spec.in_channels,
        *x.stride(),
        *w_strides,
        cout,
        *y.stride(),
    )
    meta = {
        "E": experts,
        "KH": spec.kernel_size[0],
        "KW": spec.kernel_size[1],
        "SH": spec.stride[0],
        "SW": spec.stride[1],
        "PH": top,
        "PW": left,
        "DH": spec.dilation[0],
        "DW": spec.dilation[1],
        "E_PAD": triton.next_power_of_2(experts),
        "MIX": not premix,
        "ROUTE": route,
        "HAS_BIAS": bias_arg is not None,
        "INPUT_PRECISION": "ieee" if ieee else "tf32",
    }

    def grid(config):
        co_tiles = triton.cdiv(cout // groups, config["BLOCK_CO"])
        return (triton.cdiv(positions, config["BLOCK_P"]), groups * co_tiles, batch)

    if blocks is not None or interpreting():
        blocks = blocks or _INTERPRETER_BLOCKS
        _condconv_kernel[grid({**meta, **blocks})](*args, **meta, **blocks)
    elif premix:
        _premix_kernel[grid](*args, **meta)
    else:
        _mix_kernel[grid](*args, **meta)
    return y


class _CondConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, r, spec, premix):
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, r)
        return _launch(spec, x, weight, bias, r, premix)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs = [
            None if t is None else t.detach().requires_grad_(needs)
            for t, needs in zip(saved, ctx.needs_input_grad[:4])
        ]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            x, weight, bias, r = inputs
            y = condconv2d_torch(ctx.spec, x, weight, bias, r, "batch_grouped")
            grads = iter(torch.autograd.grad(y, wanted, grad))
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None, None)


def condconv_triton(
    spec,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    r: Tensor | None,
    premix: bool | None = None,
    routing: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """CondConv with the fused kernel: ``y[b] = conv(x[b], sum_e r[b,e] W_e) + sum_e r[b,e] c_e``.

    ``spec`` is the layer's :class:`~dynaconv.layers.ConvSpec`, ``weight`` ``(E, Cout,
    Cin/groups, kh, kw)``, ``bias`` ``(E, Cout)`` or None, ``r`` ``(B, E)``. With ``r=None``,
    ``routing=(fc_weight, fc_bias)`` gives the routing ``r = sigmoid(fc(GAP(x)))``, which the
    kernel computes itself when it mixes in registers (one launch for the whole layer; not
    differentiable). ``premix``: None chooses with :func:`premix_default`. With ``r`` given
    it is differentiable (the backward recomputes the batch-folded form).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton CondConv kernel takes fp32/fp16/bf16 inputs, got {x.dtype}")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if r is None:
        if routing is None:
            raise ValueError("condconv_triton needs routing weights r or routing=(weight, bias)")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, *routing)):
            raise ValueError("in-kernel routing is not differentiable: pass r instead")
        if spec.pads_explicitly:  # the kernel would see the padded input
            r = torch.sigmoid(torch.nn.functional.linear(x.mean(dim=(2, 3)), *routing))
        return _launch(spec, x, weight, bias, r, premix, routing)
    if r.dtype != x.dtype:
        r = r.to(x.dtype)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, r)
    ):
        return _CondConvTriton.apply(x, weight, bias, r, spec, premix)
    return _launch(spec, x, weight, bias, r, premix)
