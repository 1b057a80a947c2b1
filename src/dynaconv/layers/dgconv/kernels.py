"""Triton kernels for DGConv: the masked kernel ``weight * U`` in one pass, forward and backward.

The connectivity mask ``U`` (``C x C`` for ``C = 2^K`` channels) is never stored. For an
element of the kernel at output channel ``o`` and input channel ``i``, with ``x = o XOR i``,

    U[o, i] = prod over gates k with bit_k(x) = 1 of b_k,

where ``b_k = (sign(gate_k) + 1) / 2`` and ``bit_k`` reads the bit at gate ``k``'s position in
the Kronecker product (gate 0 = most significant bit; with ``sort`` the gates are placed by a
stable ascending sort of ``b``, so identity factors come first). The forward kernel computes
``b`` and the positions from the raw gates itself, so a training step launches a single kernel
before the convolution, and writes them to two ``K``-vectors that the backward reuses.

The backward kernel returns ``grad_weight = grad * U`` and, per program, the partial sums

    d loss / d b_k = sum over elements of grad * weight * bit_k(x) * prod_{l != k, bit_l(x)} b_l

(the leave-one-out products come from the product of the nonzero factors and the number of
zero factors, exact because every factor is 0, 0.5 or 1), which ``torch.sum`` reduces; the straight-through
estimator passes ``d loss / d b_k`` to ``gate_k`` unchanged. Shapes: ``weight`` ``(C, C, kh, kw)``
contiguous, ``gate`` ``(K,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...dispatch import triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None

__all__ = ["masked_weight"]

_BLOCK = 1024


if triton is not None:

    @triton.jit
    def _gate_table(gate_ptr, K: tl.constexpr, KPAD: tl.constexpr, SORT: tl.constexpr):
        """``(b, shift)`` as ``KPAD``-vectors: binary gate values and bit shifts of the gates."""
        slots = tl.arange(0, KPAD)
        valid = slots < K
        g = tl.load(gate_ptr + slots, mask=valid, other=0.0).to(tl.float32)
        b = tl.where(g > 0, 1.0, tl.where(g < 0, 0.0, 0.5))
        if SORT:
            # Stable ascending sort of b: the position of gate k is the number of gates before it.
            b_row = b[None, :]
            b_col = b[:, None]
            before = (b_row < b_col) | ((b_row == b_col) & (slots[None, :] < slots[:, None]))
            before = before & valid[None, :]
            position = tl.sum(before.to(tl.int32), axis=1)
        else:
            position = slots
        return b, K - 1 - position

    @triton.jit
    def _pick(vector, slots, k):
        return tl.sum(tl.where(slots == k, vector, 0), axis=0)

    @triton.jit
    def _masked_weight_fwd(
        w_ptr,
        gate_ptr,
        out_ptr,
        b_ptr,
        shift_ptr,
        numel,
        channels,
        kernel_numel,
        K: tl.constexpr,
        KPAD: tl.constexpr,
        SORT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        slots = tl.arange(0, KPAD)
        b, shift = _gate_table(gate_ptr, K, KPAD, SORT)
        first = (slots < K) & (pid == 0)
        tl.store(b_ptr + slots, b, mask=first)
        tl.store(shift_ptr + slots, shift, mask=first)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < numel
        row = offs // (channels * kernel_numel)
        col = (offs // kernel_numel) % channels
        code = row ^ col
        u = tl.full([BLOCK], 1.0, tl.float32)
        for k in tl.static_range(K):
            bit = ((code >> _pick(shift, slots, k)) & 1) != 0
            u = tl.where(bit, u * _pick(b, slots, k), u)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (w * u).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _masked_weight_bwd(
        grad_ptr,
        w_ptr,
        b_ptr,
        shift_ptr,
        grad_w_ptr,
        partial_ptr,
        numel,
        channels,
        kernel_numel,
        K: tl.constexpr,
        KPAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        slots = tl.arange(0, KPAD)
        b = tl.load(b_ptr + slots, mask=slots < K, other=1.0)
        shift = tl.load(shift_ptr + slots, mask=slots < K, other=0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < numel
        row = offs // (channels * kernel_numel)
        col = (offs // kernel_numel) % channels
        code = row ^ col
        grad = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        grad_times_w = grad * w
        # U = product of the factors f_k (b_k where bit_k is set, else 1). Every factor is 0, 0.5
        # or 1, so the product of the nonzero factors times one's inverse is exact: the
        # leave-one-out products take two passes instead of K^2.
        nonzero_product = tl.full([BLOCK], 1.0, tl.float32)
        zeros = tl.zeros([BLOCK], tl.int32)
        for k in tl.static_range(K):
            bit = ((code >> _pick(shift, slots, k)) & 1) != 0
            factor = tl.where(bit, _pick(b, slots, k), 1.0)
            nonzero_product = nonzero_product * tl.where(factor == 0.0, 1.0, factor)
            zeros += (factor == 0.0).to(tl.int32)
        u = tl.where(zeros == 0, nonzero_product, 0.0)
        partial = tl.zeros([KPAD], tl.float32)
        for k in tl.static_range(K):
            bit = ((code >> _pick(shift, slots, k)) & 1) != 0
            factor = tl.where(bit, _pick(b, slots, k), 1.0)
            without_zero = tl.where(zeros == 1, nonzero_product, 0.0)
            inverse = tl.where(factor == 0.5, 2.0, 1.0)  # 1 / factor for the nonzero factors
            without_nonzero = tl.where(zeros == 0, nonzero_product * inverse, 0.0)
            others = tl.where(factor == 0.0, without_zero, without_nonzero)
            total = tl.sum(tl.where(bit, grad_times_w * others, 0.0), axis=0)
            partial = tl.where(slots == k, total, partial)
        tl.store(grad_w_ptr + offs, (grad * u).to(grad_w_ptr.dtype.element_ty), mask=inside)
        tl.store(partial_ptr + pid * KPAD + slots, partial)


def _padded(num_gates: int) -> int:
    return max(16, triton.next_power_of_2(num_gates))


def _geometry(weight: Tensor) -> tuple[int, int, int]:
    numel = weight.numel()
    return numel, weight.shape[1], weight.shape[2] * weight.shape[3]


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, gate: Tensor, sort: bool) -> Tensor:
        weight = weight.contiguous()
        gate = gate.contiguous()
        num_gates = gate.numel()
        out = torch.empty_like(weight)
        kpad = _padded(num_gates)
        b = torch.empty(num_gates, device=weight.device, dtype=torch.float32)
        shifts = torch.empty(num_gates, device=weight.device, dtype=torch.int32)
        numel, channels, kernel_numel = _geometry(weight)
        grid = (triton.cdiv(numel, _BLOCK),)
        _masked_weight_fwd[grid](
            weight,
            gate,
            out,
            b,
            shifts,
            numel,
            channels,
            kernel_numel,
            K=num_gates,
            KPAD=kpad,
            SORT=bool(sort),
            BLOCK=_BLOCK,
        )
        ctx.save_for_backward(weight, b, shifts)
        ctx.gate_dtype = gate.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, b, shifts = ctx.saved_tensors
        grad = grad.contiguous()
        num_gates = b.numel()
        numel, channels, kernel_numel = _geometry(weight)
        programs = triton.cdiv(numel, _BLOCK)
        kpad = _padded(num_gates)
        grad_weight = torch.empty_like(weight)
        partial = torch.empty(programs, kpad, device=weight.device, dtype=torch.float32)
        _masked_weight_bwd[(programs,)](
            grad,
            weight,
            b,
            shifts,
            grad_weight,
            partial,
            numel,
            channels,
            kernel_numel,
            K=num_gates,
            KPAD=kpad,
            BLOCK=_BLOCK,
        )
        grad_gate = partial.sum(0)[:num_gates].to(ctx.gate_dtype)
        return grad_weight, grad_gate, None


def masked_weight(weight: Tensor, gate: Tensor, sort: bool) -> Tensor:
    """``weight * U(gate)`` with the straight-through gate gradient, in one Triton kernel."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("the Triton DGConv kernel needs triton")
    return _MaskedWeight.apply(weight, gate, sort)
