"""CondConv: conditionally parameterized convolution.

Yang, Bender, Le and Ngiam, "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", NeurIPS 2019.

A layer holds ``E`` expert kernels ``W_e`` of shape ``(Cout, Cin/groups, kh, kw)`` (stored as
one ``weight`` of shape ``(E, Cout, Cin/groups, kh, kw)``) and, with ``bias=True``, one bias per
expert (``bias``: ``(E, Cout)``). For an input ``x`` of shape ``(B, Cin, H, W)``:

* routing weights ``r = sigmoid(Linear(dropout(GAP(x))))``: ``(B, E)``, computed by a
  :class:`CondConvRouting` (one per layer, or one per block shared by several layers);
* per example ``b`` the mixed kernel ``W_b = sum_e r[b, e] W_e`` and bias ``c_b = sum_e r[b, e] c_e``;
* ``y[b] = conv(x[b], W_b) + c_b``: ``(B, Cout, H', W')`` with ``nn.Conv2d``'s geometry.

Execution forms (``impl``, names as in :mod:`dynaconv.dispatch`; the math is in
:mod:`dynaconv.functional.condconv`), all exact and tested equal in float64:

* ``"loop"``: the per-example loop of the paper's code (reference; slow);
* ``"batch_grouped"`` (also spelled ``"grouped"``): the batch folded into conv groups,
  ``groups = B * groups`` (timm's form);
* ``"expert_sum"``: one conv to ``E * Cout`` channels, then the ``r``-weighted sum over experts;
* ``"bmm"``: per-example batched matrix products of the mixed kernels with the input (1x1:
  the input itself; kxk: the unfolded input);
* ``"taps"``: the per-example mixed kernels applied one kernel tap at a time: for tap
  ``(i, j)`` a batched matrix product of ``W_b[:, :, i, j]`` ``(Cout/g, Cin/g)`` with the
  input's strided window at that offset, summed over the ``kh * kw`` taps. The conv's MACs
  exactly (``expert_sum`` does ``E`` times them), no unfolded copy of the input (one tap's
  window at a time), and only static slicing and matmuls: the export form of kxk layers;
* ``"triton"``: a fused kernel (:mod:`dynaconv.kernels.condconv`): an implicit-GEMM conv per
  example that mixes the expert kernels tile by tile in registers (or reads kernels mixed
  beforehand by one matrix product when an example has many output positions). In inference
  with the layer's own routing the kernel also computes the routing itself (one launch);
  other padding modes pad explicitly first. Training through it is exact (its backward
  recomputes the grouped form), but ``"auto"`` trains with the PyTorch forms;
* ``"auto"`` (default): chosen per call from the shape and device, see
  :func:`dynaconv.dispatch.condconv_form` (``"torch"``: the same, never ``"triton"``);
  on CUDA with ``torch.backends.cudnn.benchmark`` on, inference measures the candidates once
  per input shape and keeps the fastest (like cuDNN's algorithm search).

``deploy()`` cannot return a static conv (the kernel depends on the input): it returns an
eval-mode copy whose form is fixed (``impl`` resolved, or the one given), see
:meth:`CondConv2d.deploy`. ``aux_loss()`` is zero: CondConv has no regulariser.

Mixing cost (counted in the active MACs of :func:`dynaconv.profile`): ``B * E * numel(W_e)``.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import (
    CONDCONV_BATCH_DEPENDENT,
    FAMILY_IMPLS,
    condconv_export_form,
    condconv_form,
    measured_choices,
    measuring,
    resolve_impl,
    tracing,
    triton_available,
)
from ..families import register_family
from ..functional.condconv import (
    TORCH_FORMS,
    add_bias,
    batch_independent_form,
    check_routing_weights,
    empty_batch,
    fixed_batch_graph,
    mix,
)
from ._base import (
    Convention,
    ConvSpec,
    DynaConv2d,
    MacCount,
    Shape,
    check_input,
    kaiming_uniform_,
)

if triton_available():  # the fused kernel (triton ships with PyTorch's CUDA builds)
    from ..kernels import condconv as _kernels
else:  # pragma: no cover - depends on the installation
    _kernels = None

__all__ = ["CondConv2d", "CondConvRouting", "condconv2d"]

log = logging.getLogger("dynaconv")

#: The execution forms of :class:`CondConv2d` (plus ``"auto"`` and ``"torch"``).
FORMS = ("loop", "batch_grouped", "expert_sum", "bmm", "taps", "triton")
_IMPLS = FAMILY_IMPLS["condconv"]


class CondConvRouting(nn.Module):
    """``r = sigmoid(Linear(dropout(GAP(x))))``: routing weights ``(B, E)`` from ``(B, Cin, H, W)``.

    Use one per layer (inside :class:`CondConv2d`) or one per block, computed on the block
    input and passed to the block's layers as ``layer(h, routing_weights=r)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        dropout: float = 0.0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        _check_experts(num_experts)
        _check_dropout(dropout)
        self.dropout = float(dropout)
        self.fc = nn.Linear(in_channels, num_experts, device=device, dtype=dtype)

    @property
    def num_experts(self) -> int:
        return self.fc.out_features

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        pooled = F.dropout(pooled, self.dropout, self.training)
        return torch.sigmoid(self.fc(pooled))

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}" if self.dropout else ""


def _check_experts(num_experts: int) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def _check_dropout(dropout: float) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"routing_dropout must be a number in [0, 1), got {dropout!r}")


def _check_impl(impl: Any) -> str:
    return resolve_impl(impl, _IMPLS)


def _triton(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    if _kernels is None:
        raise ValueError("impl='triton' needs triton, which is not installed")
    return _kernels.condconv_triton(spec, x, weight, bias, r)


def export_form(spec: ConvSpec, weight: Tensor | None = None) -> str:
    """The form a traced, compiled or exported layer runs (see :func:`choose_form`)."""
    return condconv_export_form(spec)


def choose_form(spec: ConvSpec, x: Tensor, weight: Tensor, needs_grad: bool) -> str:
    """The form ``impl="auto"`` runs for this call: :func:`dynaconv.dispatch.condconv_form`."""
    return condconv_form(spec, x.device, x.dtype, needs_grad)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def condconv2d(
    spec: ConvSpec,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    routing_weights: Tensor,
    impl: str = "auto",
) -> Tensor:
    """Functional CondConv: ``y[b] = conv(x[b], sum_e r[b, e] weight[e]) + sum_e r[b, e] bias[e]``.

    ``routing_weights`` must be floating point of shape ``(B, E)`` (``ValueError`` otherwise).
    ``impl``: one of CondConv's names in :mod:`dynaconv.dispatch` (``"auto"`` by default).
    An empty batch runs a batch-independent form (``"loop"``, ``"batch_grouped"`` and
    ``"triton"`` have nothing to launch) and gives an empty output of the right shape.
    """
    impl = _check_impl(impl)
    check_routing_weights(routing_weights, x.shape[0], weight.shape[0])
    if impl in CONDCONV_BATCH_DEPENDENT and empty_batch(x):
        impl = batch_independent_form(spec)
    if impl in ("auto", "torch"):
        needs_grad = _needs_grad(x, weight, bias, routing_weights)
        impl = condconv_form(spec, x.device, x.dtype, needs_grad, allow_triton=impl == "auto")
    if impl == "triton":
        return _triton(spec, x, weight, bias, routing_weights)
    return TORCH_FORMS[impl](spec, x, weight, bias, routing_weights)


# ---------------------------------------------------------------------------------------------


@register_family("condconv", demo_options={"num_experts": 4}, structure_plot="routing")
class CondConv2d(DynaConv2d):
    """Conditionally parameterized convolution (drop-in for ``nn.Conv2d``).

    Args: those of ``nn.Conv2d``, plus

    * ``num_experts``: number of expert kernels ``E`` (default 8);
    * ``routing_dropout``: dropout on the pooled input of the routing function in training
      (default 0);
    * ``impl``: execution form, ``"auto"`` (default) or one of :data:`FORMS` (module docstring);
    * ``shared_routing``: when True the layer has no routing function of its own and
      ``forward`` must be given ``routing_weights=`` (computed once per block by a
      :class:`CondConvRouting` on the block input, as EfficientNet-CondConv does);
    * ``bias_per_expert``: with ``bias=True``, one bias per expert mixed like the kernels
      (default, ``bias``: ``(E, Cout)``), or when False a single unmixed bias ``(Cout,)``
      (the layout of the seed document's reference code).

    ``forward(x, routing_weights=None)``: ``routing_weights`` ``(B, E)`` (floating point, one
    row per example; ``ValueError`` otherwise) overrides the layer's own routing. An empty
    batch gives an empty output. ``weight`` is the expert kernel bank
    ``(E, Cout, Cin/groups, kh, kw)`` (there is no single effective kernel;
    :meth:`mixed_kernels` gives the per-example ones) and ``bias`` the per-expert biases
    ``(E, Cout)``.
    """

    title = "CondConv"

    def _init_family(
        self,
        device: Any,
        dtype: Any,
        *,
        num_experts: int = 8,
        routing_dropout: float = 0.0,
        impl: str = "auto",
        shared_routing: bool = False,
        bias_per_expert: bool = True,
    ) -> None:
        s = self.spec
        in_channels, out_channels, groups, bias = s.in_channels, s.out_channels, s.groups, s.bias
        _check_experts(num_experts)
        _check_dropout(routing_dropout)
        if not isinstance(shared_routing, bool):
            raise ValueError(f"shared_routing must be a bool, got {shared_routing!r}")
        if not isinstance(bias_per_expert, bool):
            raise ValueError(f"bias_per_expert must be a bool, got {bias_per_expert!r}")
        self.bias_per_expert = bias_per_expert
        self.impl = _check_impl(impl)
        self.num_experts = num_experts
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *s.kernel_size, **factory)
        )
        bias_shape = (num_experts, out_channels) if bias_per_expert else (out_channels,)
        self.bias = nn.Parameter(torch.empty(bias_shape, **factory)) if bias else None
        self.routing = (
            None
            if shared_routing
            else CondConvRouting(in_channels, num_experts, routing_dropout, **factory)
        )
        self.reset_parameters()

    @property
    def shared_routing(self) -> bool:
        return self.routing is None

    @property
    def routing_dropout(self) -> float:
        return 0.0 if self.routing is None else self.routing.dropout

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Conv2d`` (kaiming-uniform, a = sqrt 5)."""
        fan_in = self.weight[0, 0].numel()
        kaiming_uniform_(self.weight, fan_in)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.routing is not None:
            self.routing.fc.reset_parameters()

    def routing_weights(self, x: Tensor) -> Tensor:
        """The layer's own routing weights ``(B, E)`` for input ``x``."""
        if self.routing is None:
            raise ValueError(
                "this CondConv2d has shared_routing=True: pass routing_weights= to forward"
            )
        return self.routing(x)

    def mixed_kernels(self, routing_weights: Tensor) -> Tensor:
        """Per-example kernels ``(B, Cout, Cin/groups, kh, kw)`` for routing weights ``(B, E)``."""
        return mix(routing_weights, self.weight)

    def forward(self, x: Tensor, routing_weights: Tensor | None = None) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        if routing_weights is not None:
            check_routing_weights(routing_weights, x.shape[0], self.num_experts)
        if empty_batch(x):  # nothing to launch or measure; every form gives the same
            form, premix = batch_independent_form(self.spec), None
        else:
            form, premix = self._resolve(x, routing_weights)
        return self._run(form, premix, x, routing_weights)

    def _needs_grad(self, x: Tensor, routing_weights: Tensor | None) -> bool:
        return _needs_grad(x, routing_weights, *self.parameters())

    def _resolve(self, x: Tensor, routing_weights: Tensor | None) -> tuple[str, bool | None]:
        """The form to run (and, for ``"triton"``, whether to premix; None: its heuristic).

        Traced, compiled or exported, the batch-dependent forms (``"loop"``,
        ``"batch_grouped"``) and the opaque kernel (``"triton"``) are replaced by
        :func:`export_form` (all forms are exact), so a deployed layer exports too. With a
        constant batch (:func:`~dynaconv.functional.condconv.fixed_batch_graph`, e.g.
        ``torch.export`` without a dynamic batch) kxk layers run ``"batch_grouped"``: the
        kernel mixing (one matrix product) and one convolution, with the conv's MACs
        (``"taps"`` and ``"expert_sum"`` are the dynamic batch's forms); 1x1 layers keep
        ``"bmm"``, at batch 1 the same product as a conv, and onnxruntime runs a MatMul of two
        computed operands faster than a Conv whose kernel is not a constant
        (``benchmarks/NOTES.md``).
        """
        if tracing() and self.spec.kernel_size != (1, 1) and fixed_batch_graph(x):
            return "batch_grouped", None
        impl = _check_impl(self.impl)
        if impl not in ("auto", "torch"):
            if impl in CONDCONV_BATCH_DEPENDENT and tracing():
                return condconv_export_form(self.spec), None
            return impl, None
        needs_grad = self._needs_grad(x, routing_weights)
        form = condconv_form(self.spec, x.device, x.dtype, needs_grad, impl == "auto")
        if form == "triton" and measuring(x):
            return self._measured_form(x, routing_weights)
        return form, None

    def _run(
        self, form: str, premix: bool | None, x: Tensor, routing_weights: Tensor | None
    ) -> Tensor:
        bias = self.bias if self.bias_per_expert else None
        if routing_weights is None and form == "triton" and self._routing_in_kernel(x):
            fc = self.routing.fc
            y = self._kernels().condconv_triton(
                self.spec, x, self.weight, bias, None, premix, routing=(fc.weight, fc.bias)
            )
        else:
            r = self.routing_weights(x) if routing_weights is None else routing_weights
            r = r.to(self.weight.dtype)
            if form == "triton":
                y = self._kernels().condconv_triton(self.spec, x, self.weight, bias, r, premix)
            else:
                y = condconv2d(self.spec, x, self.weight, bias, r, form)
        if self.bias is not None and not self.bias_per_expert:
            y = add_bias(y, self.bias[None])
        return y

    @staticmethod
    def _kernels() -> Any:
        if _kernels is None:
            raise ValueError("impl='triton' needs triton, which is not installed")
        return _kernels

    def _routing_in_kernel(self, x: Tensor) -> bool:
        """Whether the fused kernel may compute the routing itself (no dropout, no gradient)."""
        return (
            self.routing is not None
            and (self.routing.dropout == 0 or not self.training)
            and not self._needs_grad(x, None)
        )

    def _measured_form(self, x: Tensor, routing_weights: Tensor | None) -> tuple[str, bool | None]:
        """The fastest inference form for this shape, measured once per shape and cached.

        Used by ``impl="auto"`` on CUDA when ``torch.backends.cudnn.benchmark`` is on (the
        same switch as cuDNN's own algorithm search, see :func:`dynaconv.dispatch.measuring`).
        Candidates: the fused kernel mixing in registers and premixed, the batch-folded
        grouped conv, and ``"bmm"`` (1x1) or ``"expert_sum"`` (kxk). Kept in
        :data:`dynaconv.dispatch.measured_choices` (a performance cache, not model state).
        """
        key = (
            "condconv",
            x.device,
            x.dtype,
            self.spec,
            tuple(x.shape),
            x.is_contiguous(),
            self.num_experts,
            self.bias is not None,
            routing_weights is None and self._routing_in_kernel(x),
        )
        other = batch_independent_form(self.spec)
        candidates = [("triton", False), ("triton", True), ("batch_grouped", None), (other, None)]
        return measured_choices.choose(
            key,
            candidates,
            lambda c: self._run(c[0], c[1], x, routing_weights),
            label="CondConv2d",
            fallback=("triton", None),
        )

    def inference_form(self, device: torch.device | str | None = None) -> str:
        """The form :meth:`deploy` fixes: ``impl`` if it names a form, else the choice of
        :func:`dynaconv.dispatch.condconv_form` for an eval forward without gradient on
        ``device`` (default: the weights'): the rule every such forward runs, so a deployed
        layer computes as the layer did in eval mode (``"torch"``: without Triton)."""
        impl = _check_impl(self.impl)
        if impl not in ("auto", "torch"):
            return impl
        device = torch.device(device) if device is not None else self.weight.device
        return condconv_form(self.spec, device, self.weight.dtype, False, impl == "auto")

    def deploy(self, impl: str | None = None) -> CondConv2d:
        """An eval-mode copy with its execution form fixed (the layer stays dynamic).

        CondConv has no static equivalent: the kernel depends on the input. The copy keeps the
        weights and routing; its ``impl`` is ``impl`` if given, else :meth:`inference_form`
        (so it no longer re-decides per call). When traced, compiled or exported the layer
        runs :func:`export_form` (``"bmm"`` for 1x1, ``"taps"`` for kxk, ``"expert_sum"`` for
        depthwise kxk) instead of a batch-dependent or Triton form, so a deployed model still
        exports with a dynamic batch; exported for a fixed batch (``dynaconv export --batch
        1``), kxk layers run ``"batch_grouped"``: the kernel mixing and one conv.
        """
        form = self.inference_form() if impl is None else _check_impl(impl)
        deployed = copy.deepcopy(self).eval()
        deployed.impl = form
        if form in ("auto", "torch"):
            deployed.impl = deployed.inference_form()
        return deployed

    @classmethod
    def _conversion(
        cls,
        conv: nn.Conv2d,
        *,
        num_experts: int = 8,
        routing_dropout: float = 0.0,
        impl: str = "auto",
        expert_noise: float = 0.01,
    ) -> dict[str, Any]:
        """A CondConv that starts equal to ``conv`` (up to rounding), with perturbed experts.

        Copying the conv's kernel into every expert would not do: the output would be
        ``(sum_e r_e) * conv(x)``, and identical experts receive identical gradients forever.
        Instead the routing starts input-independent (linear weight 0, bias 0, so every
        ``r_e = 1/2``) and expert ``e`` is ``(2/E) * W + n_e`` with noise ``n_e`` of standard
        deviation ``expert_noise * scale(W)``, centred over the experts (``sum_e n_e = 0``). The
        mixed kernel is then ``sum_e W_e / 2 = W`` exactly; the noise breaks the symmetry so
        that the experts and the routing can specialise in training. ``scale(W)`` is the
        standard deviation of ``W``'s entries, or where that is 0 or undefined (a single
        entry, a constant kernel) their root mean square, or for an all-zero kernel
        ``nn.Conv2d``'s initial scale ``1 / sqrt(fan_in)``.

        ``expert_noise`` must be a finite number ``>= 0`` (``ValueError`` otherwise).
        """
        if (
            isinstance(expert_noise, bool)
            or not isinstance(expert_noise, int | float)
            or not math.isfinite(expert_noise)
            or expert_noise < 0
        ):
            raise ValueError(
                f"expert_noise must be a finite number >= 0 (a fraction of the kernel's "
                f"scale), got {expert_noise!r}"
            )
        return {"num_experts": num_experts, "routing_dropout": routing_dropout, "impl": impl}

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        scale = 2.0 / self.num_experts
        weight = conv.weight
        noise = torch.randn_like(self.weight) * (options["expert_noise"] * _noise_scale(weight))
        self.weight.copy_(scale * weight + (noise - noise.mean(dim=0, keepdim=True)))
        if conv.bias is not None:
            self.bias.copy_((scale * conv.bias).expand_as(self.bias))
        self.routing.fc.weight.zero_()
        self.routing.fc.bias.zero_()

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        """Dense: the conv (plus the own routing's linear map); active adds the kernel mixing.

        The mixing is ``B * E * numel(W_e)`` multiply-accumulates. The routing linear map
        (``B * Cin * E``) is counted in both when the layer owns its routing, as
        :func:`dynaconv.profile` counts every ``nn.Linear``; a shared :class:`CondConvRouting`
        is counted by the profile itself.
        """
        batch = output_shape[0]
        dense = self.spec.dense_macs(output_shape)
        if self.routing is not None:
            dense += batch * self.spec.in_channels * self.num_experts
        mixing = batch * self.weight.numel()
        return MacCount(dense, dense + mixing)

    def structure(self) -> str:
        return f"experts={self.num_experts}"

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"num_experts={self.num_experts}"]
        if self.impl != "auto":
            parts.append(f"impl={self.impl!r}")
        if self.routing is None:
            parts.append("shared_routing=True")
        return ", ".join(parts)


def _noise_scale(weight: Tensor) -> Tensor:
    """The scale of ``from_conv``'s expert noise: a positive, finite scalar (see there).

    A standard deviation within rounding of 0 (a constant kernel's is ~1e-17, not 0) counts
    as 0, so the noise still breaks the experts' symmetry.
    """
    values = weight.detach().flatten()
    rms = values.square().mean().sqrt()
    if values.numel() > 1:
        std = values.std()
        if bool(torch.isfinite(std)) and bool(std > 16 * torch.finfo(values.dtype).eps * rms):
            return std
    if bool(rms > 0) and bool(torch.isfinite(rms)):
        return rms
    return values.new_tensor(1.0 / math.sqrt(weight[0].numel()))
