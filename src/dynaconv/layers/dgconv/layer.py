"""DGConv: groupable convolution that learns its number of groups.

Zhang, Zhang, Li, Luo, Zhang and Li, "Differentiable Learning-to-Group Channels via Groupable
Convolutional Neural Networks", ICCV 2019.

A dense ``C x C`` convolution (``C = 2^K`` input and output channels) whose connectivity is
masked by ``U``, the Kronecker product of ``K`` learned ``2 x 2`` factors:

* gates ``g`` ``(K,)``, binarised ``b = (sign(g) + 1) / 2`` (a gate exactly 0 gives 0.5, as in
  the reference) with a straight-through estimator: ``d loss / d g = d loss / d b``. The gates
  are kept in at least float32 whatever the layer's dtype (``.half()``, ``.bfloat16()``,
  ``.to(dtype)``, ``dtype=`` in the constructor): their initial ``+-1e-8`` rounds to 0 in
  float16, which would turn the binary mask into 0.5 factors. The mask is then cast to the
  kernel's dtype (its values, products of 0s and 1s, are exact in every float type);
* ``U_k = (1 - b_k) I_2 + b_k ones(2, 2)`` and ``U = U_1 (x) U_2 (x) ... (x) U_K`` (gate 1 is the
  most significant bit). Equivalently, for channel codes ``i`` and ``j``,
  ``U[i, j] = prod over the bits where i and j differ of b_(gate at that bit)``: ``U[i, j] = 1``
  iff ``i`` and ``j`` agree on every bit whose gate is 0. This rule builds ``U`` with no
  Kronecker loop: ``U[i, j] = v[i XOR j]`` with ``v[x] = prod_{k: bit_k(x)} b_k``;
* ``sort=True`` places the factors by a stable ascending sort of ``b`` (identity factors first,
  then the 0.5 factors, then the all-ones ones), so ``U`` is contiguous block-diagonal; the bit
  rule holds with each gate read at its sorted position;
* output: ``conv(x, weight * U[:, :, None, None])``; ``2^(number of zero gates)`` groups;
* regulariser (``aux_loss``): ``2^(K + sum b) / C^2 = 2^(sum b - K)``, the *fraction* of the
  ``C x C`` connections that ``U`` keeps (in ``[1/C, 1]``). The reference's regulariser is the
  count ``2^(K + sum b)`` (:meth:`GroupableConv2d.active_connections`); as a count it grows
  with ``C^2`` (1,048,576 for a converted ResNet-18) and would dwarf the task loss under a
  weight that suits the other families' regularisers, so ``aux_loss`` is normalised. The
  authors train under a budget instead (:class:`ResourceConstraint`, built on the count).

Shapes: input ``(B, C, H, W)``, dense kernel ``(C, C, kh, kw)``, output ``(B, C, H', W')``.

Every forward computes the masked kernel from the current gates and kernel, in eval mode too
(an elementwise product with a mask built from ``K`` gates). There is deliberately no cache:
an edit through ``.data`` leaves no trace a cache could check, and a stale kernel would
silently compute with old weights. For inference, :meth:`GroupableConv2d.deploy` returns the
grouped convolution with the kernel stored.

Channel counts that are not equal powers of two raise ``ValueError``: the groups DGConv can
learn are the ``2^m`` classes of a ``K``-bit code, so ``C`` must be ``2^K`` on both sides (the
reference takes ``K = int(log2(C))`` and fails later with a shape error). Use ``convert`` to
apply DGConv to the convs that qualify; the others are skipped with this reason.

Deployment: sorting the channels by their bits at the zero-gate positions, then by the other
bits, makes ``U`` block-diagonal, so the layer is a real grouped conv with ``2^(#zeros)`` groups
between an input gather and an output permutation
(:class:`~dynaconv.layers.dgconv.deployed.PermutedGroupConv2d`; a plain ``nn.Conv2d`` when the
permutation is the identity, e.g. with ``sort=True``).
:func:`dynaconv.models.surgery.fold_bottleneck` folds the permutation into the neighbouring 1x1
convs and BatchNorms instead, which :class:`dynaconv.models.GResNeXt` does for every bottleneck
(:func:`dynaconv.models.fold_bottlenecks` does it for any network of torchvision bottlenecks).

Initialisation: a layer built by the constructor (the papers' networks, ``G-ResNeXt``) starts
with the paper's gates, ``+-1e-8`` with random signs. A layer converted from a conv
(:meth:`GroupableConv2d.from_conv`, :func:`dynaconv.convert`) starts from the conv's structure
with a margin: gates ``-gate_init`` for its groups' bits and ``+gate_init`` for the others,
``gate_init = 0.1`` by default (:data:`CONVERSION_GATE_INIT`). An SGD step moves a gate by
the learning rate times its gradient; the gate gradients of a freshly converted ResNet-18
measured at most 0.15 with 224 x 224 inputs, 0.33 with 64 x 64 (batch 8) and 4.3 with 32 x 32
(batch 4), so one step of learning rate 0.1 (0.01 on the smallest inputs) keeps the conv's
structure, and the structure changes only where the gradient keeps pushing over several
steps. At ``1e-8`` a single step flips gates at random (a converted ResNet-18 went from 1
group per layer to 2-128 groups after one SGD step of learning rate 0.01).
``gate_init=1e-8`` restores the paper's value.

Resource-constrained training (the authors' objective,
:mod:`dynaconv.layers.dgconv.resource_constraint`): :class:`ResourceConstraint` and
:func:`resource_constrained_loss` scale the task loss by ``(cost / budget) ^ 0.02`` while the
cost of the DGConv layers is above the budget, the budget being a fraction of their dense
parameters or MACs. The authors' sketch writes the factor as ``(budget / cost) ^ 0.02``, a
MnasNet-style *reward* to maximise; multiplied into a loss that is minimised it would reward
exceeding the budget (its gradient raises the cost), so the exponent's sign is flipped here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ...dispatch import tracing, triton_preferred, triton_unusable_reason
from ...families import register_family
from ...spec import check_input, check_number
from .._base import (
    Convention,
    ConversionSkipped,
    DynaConv2d,
    Form,
    FormCall,
    Forms,
    MacCount,
    Shape,
)
from . import kernels as dgconv_kernels
from .deployed import PermutedGroupConv2d

__all__ = [
    "GroupableConv2d",
    "PermutedGroupConv2d",
    "binarise_gates",
    "connectivity_mask",
]


Impl = Literal["auto", "torch", "triton"]
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GATE_INIT = 1e-8
#: Default gate magnitude of a layer converted from a conv (module docstring).
CONVERSION_GATE_INIT = 0.1


def binarise_gates(gate: Tensor) -> Tensor:
    """``(sign(gate) + 1) / 2`` with the straight-through gradient (value binary, grad 1)."""
    hard = (torch.sign(gate.detach()) + 1) / 2
    return hard + (gate - gate.detach())


def kronecker_order(b: Tensor, sort: bool) -> Tensor:
    """The gate values in Kronecker order (most significant bit first), differentiably.

    With ``sort`` the order is a stable ascending sort of ``b``: identity factors (``b = 0``)
    first, as the reference's descending sort of ``1 - b`` orders them.
    """
    if not sort:
        return b
    return b[torch.sort(b.detach(), stable=True).indices]


def code_bits(num_bits: int, device: Any = None) -> Tensor:
    """``bits[x, p]``: bit ``p`` (``p = 0`` most significant) of the ``num_bits``-bit code ``x``."""
    codes = torch.arange(2**num_bits, device=device)
    shifts = torch.arange(num_bits - 1, -1, -1, device=device)
    return ((codes[:, None] >> shifts) & 1).bool()


def _xor_vector(b: Tensor, bits: Tensor) -> Tensor:
    """``v[x] = prod_{p: bit_p(x)} b[p]`` for every code ``x``, with its exact Jacobian.

    The value is computed without autograd and the gradient enters through the Jacobian
    ``J[x, p] = bit_p(x) prod_{q != p, bit_q(x)} b[q]`` (a product with zeros has no
    division-free autograd formula that avoids a device sync).
    """
    with torch.no_grad():
        hard = b.detach()
        factors = torch.where(bits, hard, torch.ones_like(hard))  # (C, K)
        value = factors.prod(dim=1)
        num_bits = hard.numel()
        own = torch.eye(num_bits, dtype=torch.bool, device=b.device)
        others = torch.where(own, torch.ones_like(hard), factors[:, None, :]).prod(dim=2)
        jacobian = torch.where(bits, others, torch.zeros_like(others))  # (C, K)
    return value + jacobian @ (b - hard)


def connectivity_mask(b: Tensor, bits: Tensor | None = None) -> Tensor:
    """The ``C x C`` mask ``U = U_1 (x) ... (x) U_K`` from gate values ``b`` in Kronecker order.

    ``U[i, j] = v[i XOR j]`` (see :func:`_xor_vector`); differentiable in ``b``.
    """
    num_bits = b.numel()
    if bits is None:
        bits = code_bits(num_bits, b.device)
    codes = torch.arange(2**num_bits, device=b.device)
    return _xor_vector(b, bits)[codes[:, None] ^ codes[None, :]]


def _deploy_order(b_kron: Tensor) -> Tensor:
    """Channel order that makes ``U`` block-diagonal: zero-gate bits first, then the rest.

    ``order[n]`` is the original channel at new position ``n``.
    """
    num_bits = b_kron.numel()
    zero = (b_kron == 0).tolist()
    positions = [p for p in range(num_bits) if zero[p]] + [
        p for p in range(num_bits) if not zero[p]
    ]
    bits = code_bits(num_bits, b_kron.device).long()
    weights = 2 ** torch.arange(num_bits - 1, -1, -1, device=b_kron.device)
    new_code = (bits[:, positions] * weights).sum(dim=1)
    return torch.argsort(new_code)


def _run(form: str) -> Any:
    def run(layer: GroupableConv2d, x: Tensor) -> Tensor:
        return layer.spec.conv2d(x, layer.masked_weight(form), layer.bias)

    run.__name__ = f"run_{form}"
    return run


def _rule(layer: GroupableConv2d, call: FormCall) -> list[str]:
    """Without measuring: the fused kernel on CUDA for the float dtypes it is tuned for."""
    fused = triton_preferred(call.x) and layer.dense_weight.dtype in _TRITON_DTYPES
    return ["triton", "torch"] if fused else ["torch"]


#: DGConv's execution forms (the declaration :class:`~dynaconv.layers.ChoosesForm` reads):
#: the masked kernel built in PyTorch (``"torch"``) or by the fused kernel (``"triton"``,
#: :mod:`dynaconv.layers.dgconv.kernels`), then the conv.
FORMS = Forms(
    forms={
        "torch": Form(_run("torch")),
        "triton": Form(_run("triton"), triton=True, traceable=False),
    },
    rule=_rule,
    export=lambda layer, x: "torch",
    key=lambda layer, x, *args: (layer.spec, layer.sort),
)


@register_family("dgconv")
class GroupableConv2d(DynaConv2d):
    """Groupable convolution (drop-in for a square ``nn.Conv2d`` with ``C = 2^K`` channels).

    Args: those of ``nn.Conv2d`` (``in_channels == out_channels == 2^K``, ``groups=1``), plus
    ``sort``: order the Kronecker factors identity-first (contiguous groups, no permutation at
    deployment); ``impl``: ``"auto"`` (the faster of the fused Triton kernel and PyTorch on
    CUDA, measured; PyTorch on CPU and under ``torch.compile``), ``"torch"`` or ``"triton"``
    (:data:`FORMS`).

    Parameters: ``gate`` ``(K,)`` (initialised to ``+-1e-8`` with random signs), ``dense_weight``
    ``(C, C, kh, kw)`` and ``bias``. ``.weight`` is the masked kernel.
    """

    title = "DGConv"
    conv_groups = "learn"
    forms = FORMS
    static_kernel = True

    def structure_maps(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The learned number of groups: ``2^`` (the gates with ``b = 0``)."""
        return {"learned groups": torch.tensor(2.0 ** int((self.gate.detach() < 0).sum()))}

    #: The gates' signs are the learned groups: an EMA copies them instead of averaging.
    structural_parameters: ClassVar[tuple[str, ...]] = ("gate",)

    def _init_family(
        self,
        device: Any,
        dtype: Any,
        *,
        sort: bool = False,
        impl: Impl = "auto",
    ) -> None:
        s = self.spec
        in_channels, out_channels, groups, bias = s.in_channels, s.out_channels, s.groups, s.bias
        if groups != 1:
            raise ValueError(
                f"groups must be 1 for GroupableConv2d (it learns its groups; use "
                f"GroupableConv2d.from_conv to start from a grouped conv), got {groups}"
            )
        self.num_gates = _channel_bits(in_channels, out_channels)
        if not isinstance(sort, bool):
            raise ValueError(f"sort must be a bool, got {sort!r}")
        self.sort = sort
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Parameter(
            torch.empty(self.num_gates, device=device, dtype=gate_dtype(dtype))
        )
        self.dense_weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.spec.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation for the kernel and bias; gates ``+-1e-8``, random signs."""
        nn.init.kaiming_uniform_(self.dense_weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.dense_weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            signs = torch.randint(0, 2, self.gate.shape, device=self.gate.device) * 2 - 1
            self.gate.copy_(signs * GATE_INIT)

    def _apply(self, fn: Any, recurse: bool = True) -> GroupableConv2d:
        """``nn.Module._apply`` (``.to``, ``.half``, ...) keeping the gates in float32 or wider.

        A dtype conversion below float32 would round gates near 0 (the initial ``+-1e-8``) to
        0 and change the binary mask; the gate (and its gradient) take the conversion's device
        and ``promote_types(its dtype, float32)`` instead.
        """

        def convert(tensor: Tensor) -> Tensor:
            converted = fn(tensor)
            if (
                (tensor is self.gate or tensor is self.gate.grad)
                and converted.is_floating_point()
                and converted.dtype != gate_dtype(converted.dtype)
            ):
                return tensor.to(device=converted.device, dtype=gate_dtype(converted.dtype))
            return converted

        return super()._apply(convert, recurse)

    # ---------------------------------------------------------------------------- structure
    def gate_values(self) -> Tensor:
        """Binary gate values ``b`` (with the straight-through gradient), in gate order."""
        return binarise_gates(self.gate)

    def mask(self) -> Tensor:
        """The connectivity mask ``U`` ``(C, C)`` (differentiable in the gates)."""
        return connectivity_mask(kronecker_order(self.gate_values(), self.sort))

    @property
    def num_groups(self) -> int:
        """Groups of the learned structure: ``2^(number of gates with b = 0)``."""
        return 2 ** int((self.gate.detach() < 0).sum())

    def _weight_form(self) -> str:
        """The form of :meth:`masked_weight` outside a forward (``.weight``, ``deploy``):
        ``impl`` when it names one, else the rule's choice for the weights' device."""
        impl = self.impl
        if impl in FORMS.forms and not (tracing() and not FORMS[impl].traceable):
            return impl
        if impl == "auto" and not tracing():
            call = FormCall(self.dense_weight, False, False)
            return self.ruled_form(call, self.form_candidates(call))
        return "torch"

    def masked_weight(self, form: str | None = None) -> Tensor:
        """``dense_weight * U``: the effective kernel (differentiable), built by ``form``
        (``"torch"`` or ``"triton"``; default: see :meth:`_weight_form`). ``"triton"`` where
        the kernel cannot run is a ``ValueError`` saying why (no silent fallback)."""
        form = self._weight_form() if form is None else form
        if form == "triton":
            why = triton_unusable_reason(self.dense_weight, self.gate)
            if why is not None:
                raise ValueError(f"impl='triton' cannot run here: {why}")
            return dgconv_kernels.masked_weight(self.dense_weight, self.gate, self.sort)
        return self.dense_weight * self.mask()[:, :, None, None].to(self.dense_weight.dtype)

    @property
    def weight(self) -> Tensor:
        """The effective (masked) kernel, as ``nn.Conv2d.weight`` would hold it."""
        return self.masked_weight()

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        return self.run_form(x)

    def active_connections(self) -> Tensor:
        """The reference regulariser ``2^(K + sum b)``: the number of active connections of
        ``U`` (differentiable in the gates through the straight-through estimator)."""
        return torch.pow(2.0, self.num_gates + self.gate_values().sum())

    def aux_loss(self) -> Tensor:
        """The fraction of active connections, ``2^(sum b - K)`` in ``[1/C, 1]``.

        :meth:`active_connections` divided by ``C^2``: a scale-free regulariser, so one
        ``aux_loss`` weight suits every layer width (the module docstring says why).
        """
        return torch.pow(2.0, self.gate_values().sum() - self.num_gates)

    # ---------------------------------------------------------------------------- deploy
    def grouped_form(self) -> tuple[Tensor, nn.Conv2d]:
        """``(order, conv)``: a grouped ``nn.Conv2d`` equal to the layer on permuted channels.

        ``layer(x) == conv(x[:, order])[:, argsort(order)]``. ``conv`` has
        ``2^(number of zero gates)`` groups and the layer's geometry, device and dtype.
        """
        with torch.no_grad():
            b_kron = kronecker_order(binarise_gates(self.gate), self.sort)
            order = _deploy_order(b_kron)
            groups = 2 ** int((b_kron == 0).sum())
            channels = self.spec.in_channels
            size = channels // groups
            kh, kw = self.spec.kernel_size
            permuted = self.masked_weight().index_select(0, order).index_select(1, order)
            blocks = permuted.reshape(groups, size, groups, size, kh, kw)
            grouped = blocks.diagonal(dim1=0, dim2=2).permute(4, 0, 1, 2, 3)
            conv = self.spec.make_conv(
                device=self.dense_weight.device, dtype=self.dense_weight.dtype, groups=groups
            )
            conv.weight.copy_(grouped.reshape(channels, size, kh, kw))
            if self.bias is not None:
                conv.bias.copy_(self.bias.index_select(0, order))
        return order, conv

    def deploy(self) -> nn.Module:
        """A grouped ``nn.Conv2d`` (wrapped in the channel permutation when it is needed)."""
        order, conv = self.grouped_form()
        if torch.equal(order, torch.arange(order.numel(), device=order.device)):
            return conv
        return PermutedGroupConv2d(conv, order)

    @classmethod
    def _conversion(
        cls,
        conv: nn.Conv2d,
        *,
        sort: bool = False,
        impl: Impl = "auto",
        gate_init: float = CONVERSION_GATE_INIT,
    ) -> dict[str, Any]:
        """A DGConv equal to ``conv``: its kernel placed block-diagonally, its groups as gates.

        A conv with ``2^m`` groups starts with the first ``m`` gates at ``-gate_init`` (zero)
        and the others at ``+gate_init``, so ``U`` is exactly its block-diagonal connectivity;
        ``gate_init`` (default 0.1, the paper's constructor uses 1e-8) is the margin a gate
        must travel before the structure changes (module docstring).
        """
        try:
            _channel_bits(conv.in_channels, conv.out_channels)
        except ValueError as why:
            raise ConversionSkipped(str(why)) from None
        check_number(gate_init, "gate_init", lambda g: 0 < g < math.inf, "a positive finite number")
        return {"sort": sort, "impl": impl}

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        margin = options["gate_init"]
        groups = conv.groups
        zero_gates = groups.bit_length() - 1
        size = conv.in_channels // groups
        self.dense_weight.zero_()
        for g in range(groups):
            block = slice(g * size, (g + 1) * size)
            self.dense_weight[block, block] = conv.weight[block]
        gates = [-margin] * zero_gates + [margin] * (self.num_gates - zero_gates)
        self.gate.copy_(torch.tensor(gates))
        if conv.bias is not None:
            self.bias.copy_(conv.bias)

    # ---------------------------------------------------------------------------- reporting
    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        dense = self.spec.dense_macs(output_shape)
        return MacCount(dense, dense // self.num_groups)

    def structure(self) -> str:
        bits = "".join("1" if g > 0 else ("0" if g < 0 else "h") for g in self.gate.tolist())
        groups = self.num_groups
        plural = "s" if groups != 1 else ""
        return f"{groups} group{plural} (gates {bits}{', sorted' if self.sort else ''})"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sort={self.sort}"


def gate_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype gates are stored in for a layer of ``dtype``: float32 or wider."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    return torch.promote_types(dtype, torch.float32)


def _channel_bits(in_channels: int, out_channels: int) -> int:
    """``K`` with ``in_channels == out_channels == 2^K``, or the ValueError explaining why not."""
    if in_channels != out_channels or in_channels < 2 or in_channels & (in_channels - 1):
        raise ValueError(
            "DGConv needs in_channels == out_channels == 2^K with K >= 1 (its groups are the "
            f"classes of a K-bit channel code), got in_channels={in_channels}, "
            f"out_channels={out_channels}"
        )
    return in_channels.bit_length() - 1
