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
:mod:`dynaconv.layers.condconv.functional`), all exact and tested equal in float64:

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
* ``"triton"``: a fused kernel (:mod:`dynaconv.layers.condconv.kernels`): an implicit-GEMM conv per
  example that mixes the expert kernels tile by tile in registers (or reads kernels mixed
  beforehand by one matrix product when an example has many output positions). In inference
  with the layer's own routing the kernel also computes the routing itself (one launch);
  other padding modes pad explicitly first. Training through it is exact (its backward
  recomputes the grouped form), but ``"auto"`` trains with the PyTorch forms;
* ``"auto"`` (default): the fastest of the forms that can run the call, measured once per
  layer configuration, input shape, dtype, device and mode (training step or inference) and
  cached (:class:`~dynaconv.layers.ChoosesForm`); where measuring is off, :func:`rule`
  (``"torch"``: the same, never ``"triton"``). Traced, compiled and exported graphs run
  :func:`traced_form` (:func:`export_form`; with a constant batch, every layer runs the kernel
  mixing and one conv).

The forms are declared in :data:`FORMS` (a :class:`~dynaconv.layers.Forms`).
``deploy()`` cannot return a static conv (the kernel depends on the input): it returns an
eval-mode copy that runs the forms the layer runs in inference, see :meth:`CondConv2d.deploy`.
``aux_loss()`` is zero: CondConv has no regulariser.

Mixing cost (counted in the active MACs of :func:`dynaconv.profile`): ``B * E * numel(W_e)``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...dispatch import interpreting, resolve_impl, tracing, triton_available, triton_usable
from ...families import register_family
from ...spec import ConvSpec, check_bool, check_input, check_int, check_number
from .._base import Convention, DynaConv2d, Form, FormCall, Forms, MacCount, Shape, kaiming_uniform_
from .functional import (
    BATCH_DEPENDENT,
    TORCH_FORMS,
    add_bias,
    batch_grouped,
    batch_independent_form,
    check_routing_weights,
    empty_batch,
    fixed_batch_graph,
    mix,
)

if triton_available():  # the fused kernel (triton ships with PyTorch's CUDA builds)
    from . import kernels as _kernels
else:  # pragma: no cover - depends on the installation
    _kernels = None

__all__ = ["CondConv2d", "CondConvRouting", "condconv2d"]

log = logging.getLogger("dynaconv")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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
    check_int(num_experts, "num_experts")


def _check_dropout(dropout: float) -> None:
    check_number(dropout, "routing_dropout", lambda p: 0 <= p < 1, "a number in [0, 1)")


def export_form(spec: ConvSpec, weight: Tensor | None = None) -> str:
    """The form a traced, compiled or exported layer runs: ``"bmm"`` for 1x1 kernels,
    ``"expert_sum"`` for depthwise kxk (``Cin/groups == 1``), ``"taps"`` for other kxk.

    Plain batch-independent ops: a dynamic batch exports (the batch-folded forms do not). For
    depthwise kxk every exact form is a chain of ``kh * kw`` memory-bound passes, which
    measured 1.3-2.5x slower in onnxruntime than one depthwise conv to ``E * C`` channels
    (``benchmarks/NOTES.md``), hence ``"expert_sum"`` there.
    """
    if spec.kernel_size == (1, 1):
        return "bmm"
    return "expert_sum" if spec.in_channels // spec.groups == 1 else "taps"


def traced_form(spec: ConvSpec, x: Tensor) -> str:
    """The form a traced, compiled or exported layer runs on ``x`` (unless ``impl`` names a
    traceable form): :func:`export_form`, except with a constant batch.

    With a constant batch (:func:`~dynaconv.layers.condconv.functional.fixed_batch_graph`, e.g.
    ``torch.export`` without a dynamic batch, ``dynaconv export --batch N``) every layer runs
    ``"batch_grouped"``: the kernel mixing (one matrix product) and one convolution, with the
    conv's MACs (``"taps"`` and ``"expert_sum"`` are the dynamic batch's forms); a single
    unmixed bias is the conv's own bias. The graph then serves that batch only, so the
    batch-folded form is exact there. For 1x1 kernels the conv is the product ``"bmm"``
    computes, and onnxruntime ran both alike (``benchmarks/NOTES.md``); as a conv it can run
    onnxruntime's blocked kernels (:mod:`dynaconv.onnxruntime_nchwc`). The dynamic-batch
    export is unchanged.
    """
    if fixed_batch_graph(x):
        return "batch_grouped"
    return export_form(spec)


def rule(spec: ConvSpec, device: torch.device, dtype: torch.dtype, train: bool) -> list[str]:
    """CondConv's forms in order of preference where nothing is measured (``impl="auto"``
    with measuring off, and the functional :func:`condconv2d`); the first that can run wins.

    * Depthwise (``groups == Cin``): ``"batch_grouped"``: the folded conv is depthwise too.
    * On CUDA with Triton, floating inputs, ``Cin/groups >= 16`` and no training step:
      ``"triton"``.
    * 1x1 kernels: ``"bmm"``.
    * CPU inference with kxk kernels: ``"loop"`` (oneDNN runs the per-example convs about as
      efficiently as one batched conv); otherwise ``"batch_grouped"`` (cuDNN and oneDNN run
      grouped convs well; unfold + bmm costs memory).

    A fixed function of the configuration, the device and the mode: measured, the fastest form
    differs from it by up to an order of magnitude on CPU (``benchmarks/bench_auto.py``).
    """
    device = torch.device(device)
    order = ["batch_grouped"] if spec.groups == spec.in_channels and spec.groups > 1 else []
    if (
        device.type == "cuda"
        and not train
        and spec.in_channels // spec.groups >= 16
        and dtype in _FLOATS
        and triton_available()
        and not interpreting()
    ):
        order.append("triton")
    if spec.kernel_size == (1, 1):
        order.append("bmm")
    order += ["loop", "batch_grouped"] if device.type == "cpu" and not train else ["batch_grouped"]
    return [*order, "expert_sum", "taps", "bmm"]


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
    ``impl``: one of CondConv's names in :mod:`dynaconv.dispatch` (``"auto"`` by default: the
    first form of :func:`rule` that runs here; nothing is measured: the layer measures). An
    empty batch runs a batch-independent form (``"loop"``, ``"batch_grouped"`` and
    ``"triton"`` have nothing to launch) and gives an empty output of the right shape.
    """
    impl = resolve_impl(impl, IMPLS)
    check_routing_weights(routing_weights, x.shape[0], weight.shape[0])
    if impl in BATCH_DEPENDENT and empty_batch(x):
        impl = batch_independent_form(spec)
    if impl in ("auto", "torch"):
        if tracing():
            impl = export_form(spec)
        else:
            train = _needs_grad(x, weight, bias, routing_weights)
            allowed = [f for f in TORCH_FORMS if not (empty_batch(x) and f in BATCH_DEPENDENT)]
            if impl == "auto" and not empty_batch(x) and triton_usable(x):
                allowed.append("triton")
            impl = next(f for f in rule(spec, x.device, x.dtype, train) if f in allowed)
    if impl == "triton":
        return _kernels_module().condconv_triton(spec, x, weight, bias, routing_weights)
    return TORCH_FORMS[impl](spec, x, weight, bias, routing_weights)


def _kernels_module() -> Any:
    if _kernels is None:
        raise ValueError("impl='triton' needs triton, which is not installed")
    return _kernels


def _torch_form(name: str) -> Any:
    def run(layer: CondConv2d, x: Tensor, routing_weights: Tensor | None = None) -> Tensor:
        r = layer.routing_weights(x) if routing_weights is None else routing_weights
        r = r.to(layer.weight.dtype)
        if name == "batch_grouped" and layer._shared_bias is not None:
            # the unmixed bias as the conv's own (one pass over the output fewer)
            return batch_grouped(layer.spec, x, layer.weight, None, r, layer._shared_bias)
        y = TORCH_FORMS[name](layer.spec, x, layer.weight, layer._expert_bias, r)
        return layer._add_shared_bias(y)

    run.__name__ = f"run_{name}"
    return run


def _run_triton(
    layer: CondConv2d,
    x: Tensor,
    routing_weights: Tensor | None = None,
    premix: bool | None = None,
) -> Tensor:
    """The fused kernel; in inference with the layer's own routing it computes the routing
    too. ``premix``: whether the kernel reads kernels mixed beforehand (None: its rule)."""
    kernels = _kernels_module()
    bias = layer._expert_bias
    if routing_weights is None and layer._routing_in_kernel(x):
        fc = layer.routing.fc
        y = kernels.condconv_triton(
            layer.spec, x, layer.weight, bias, None, premix, routing=(fc.weight, fc.bias)
        )
    else:
        r = layer.routing_weights(x) if routing_weights is None else routing_weights
        y = kernels.condconv_triton(
            layer.spec, x, layer.weight, bias, r.to(layer.weight.dtype), premix
        )
    return layer._add_shared_bias(y)


def _triton_refuses(layer: CondConv2d, call: FormCall) -> str | None:
    return None if _kernels is not None else "triton is not installed"


def _key(layer: CondConv2d, x: Tensor, routing_weights: Tensor | None = None) -> tuple[Any, ...]:
    return (
        layer.spec,
        layer.num_experts,
        layer.bias is not None,
        layer.bias_per_expert,
        # the fused kernel computes the layer's own routing in inference
        routing_weights is None and layer.routing is not None,
    )


#: The largest batch at which ``impl="auto"`` measures the per-example loop in a training
#: step. Its steps run ``B`` convolutions forward and backward: at the demo's batch 64 its
#: measuring steps were most of the first steps' time, and from batch 16 on it trained at
#: 1.4-6x the fastest form on the demo's 3x3 layer (``benchmarks/NOTES.md``). In inference it
#: is always measured (one thread, 64->64 3x3 at batch 256: the fastest form, 0.8x the
#: batch-grouped conv). ``impl="loop"`` runs it anywhere.
LOOP_MAX_BATCH = 16

#: CondConv's execution forms (the declaration :class:`~dynaconv.layers.ChoosesForm` reads):
#: the PyTorch forms of :mod:`dynaconv.layers.condconv.functional` and the fused kernel.
FORMS = Forms(
    forms={
        "loop": Form(
            _torch_form("loop"),
            batch_dependent=True,
            traceable=False,
            candidate=lambda layer, call: not call.train or call.x.shape[0] <= LOOP_MAX_BATCH,
        ),
        "batch_grouped": Form(_torch_form("batch_grouped"), batch_dependent=True, traceable=False),
        "expert_sum": Form(_torch_form("expert_sum")),
        "bmm": Form(_torch_form("bmm")),
        "taps": Form(_torch_form("taps")),
        "triton": Form(
            _run_triton, triton=True, batch_dependent=True, traceable=False, refuses=_triton_refuses
        ),
    },
    rule=lambda layer, call: rule(layer.spec, call.x.device, call.x.dtype, call.train),
    export=lambda layer, x: traced_form(layer.spec, x),
    key=_key,
)

#: The canonical ``impl`` names of CondConv.
IMPLS = FORMS.impls

# ---------------------------------------------------------------------------------------------


@register_family("condconv")
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
    forms = FORMS
    example_options = MappingProxyType({"num_experts": 4})
    deploys_to_itself = True

    def structure_maps(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The mean routing weight per expert on a batch: the recorded ``(B, E)`` outputs in
        ``[0, 1]``, or ``sigmoid`` of the ``(B, E)`` logits if only those are recorded."""
        routed = [v for v in outputs.values() if v.dim() == 2 and v.shape[1] == self.num_experts]
        weights = [v for v in routed if bool(((v >= 0) & (v <= 1)).all())]
        weights = weights or [torch.sigmoid(v) for v in routed]
        if not weights:
            return {}
        return {"mean routing weight per expert": torch.stack([w.mean(0) for w in weights]).mean(0)}

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
        check_bool(shared_routing, "shared_routing")
        check_bool(bias_per_expert, "bias_per_expert")
        self.bias_per_expert = bias_per_expert
        self.impl = impl
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
        return self.run_form(x, routing_weights)

    @property
    def _expert_bias(self) -> Tensor | None:
        """The per-expert biases the forms mix (None with a single unmixed bias)."""
        return self.bias if self.bias_per_expert else None

    @property
    def _shared_bias(self) -> Tensor | None:
        """The single unmixed bias ``(Cout,)`` (None without one, or with per-expert biases)."""
        return self.bias if self.bias is not None and not self.bias_per_expert else None

    def _add_shared_bias(self, y: Tensor) -> Tensor:
        shared = self._shared_bias
        return y if shared is None else add_bias(y, shared[None])

    def _routing_in_kernel(self, x: Tensor) -> bool:
        """Whether the fused kernel may compute the routing itself (no dropout, no gradient)."""
        return (
            self.routing is not None
            and (self.routing.dropout == 0 or not self.training)
            and not _needs_grad(x, *self.parameters())
        )

    def deploy(self, impl: str | None = None) -> CondConv2d:
        """An eval-mode copy that runs the forms the layer runs in inference (it stays dynamic).

        CondConv has no static equivalent: the kernel depends on the input. The copy keeps the
        weights, routing and ``impl`` (or takes ``impl`` if given). With ``impl="auto"`` it
        looks up the very measurements of the layer's inference forwards (same configuration,
        same key), so for every input shape the deployed layer runs the form the layer ran in
        eval mode, with or without gradients (:meth:`inference_form` tells which). When traced,
        compiled or exported it runs :func:`export_form` (``"bmm"`` for 1x1, ``"taps"`` for
        kxk, ``"expert_sum"`` for depthwise kxk) instead of a batch-dependent or Triton form, so
        a deployed model still exports with a dynamic batch; exported for a fixed batch
        (``dynaconv export --batch 1``), every layer runs ``"batch_grouped"``: the kernel mixing
        and one conv (:func:`traced_form`).
        """
        form = self.impl if impl is None else FORMS.resolve(impl)
        deployed = copy.deepcopy(self).eval()
        deployed.impl = form
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
        check_number(
            expert_noise,
            "expert_noise",
            lambda v: math.isfinite(v) and v >= 0,
            "a finite number >= 0 (a fraction of the kernel's scale)",
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
