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

Execution forms (``impl``), all exact and tested equal in float64:

* ``"loop"``: the per-example loop of the paper's code (reference; slow);
* ``"grouped"``: the batch folded into conv groups, ``groups = B * groups`` (timm's form);
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
* ``"auto"`` (default): chosen per call from the shape and device, see :func:`choose_form`;
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

from ..families import register_family
from ..kernels import triton_usable
from ._base import Convention, ConvSpec, DynaConv2d, MacCount, Shape, check_input, kaiming_uniform_

__all__ = ["CondConv2d", "CondConvRouting", "condconv2d"]

log = logging.getLogger("dynaconv")

#: The execution forms of :class:`CondConv2d` (plus ``"auto"``).
FORMS = ("loop", "grouped", "expert_sum", "bmm", "taps", "triton")
_IMPLS = ("auto", *FORMS)


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


def check_routing_weights(routing_weights: Any, batch: int, num_experts: int) -> None:
    """ValueError, naming the argument and the rule, unless ``routing_weights`` fits the call.

    The rule: a floating-point tensor of shape ``(B, E)`` with ``B`` the input's batch size
    and ``E`` the number of experts. (Values are not inspected: a check for non-finite values
    would synchronise the device on every call; non-finite routing weights give non-finite
    outputs, as a non-finite input of ``nn.Conv2d`` does.)
    """
    if not isinstance(routing_weights, Tensor):
        raise ValueError(
            f"routing_weights must be a tensor of shape (B, num_experts), got "
            f"{type(routing_weights).__name__}"
        )
    if not routing_weights.is_floating_point():
        raise ValueError(
            f"routing_weights must be a floating-point tensor, got dtype {routing_weights.dtype}"
        )
    if routing_weights.dim() != 2 or routing_weights.shape[1] != num_experts:
        raise ValueError(
            f"routing_weights must have shape (B, num_experts) = (B, {num_experts}), got "
            f"{tuple(routing_weights.shape)}"
        )
    if routing_weights.shape[0] != batch:
        raise ValueError(
            f"routing_weights must have one row per example: the input has batch size {batch}, "
            f"routing_weights has shape {tuple(routing_weights.shape)}"
        )


def _check_impl(impl: str) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    return impl


# ---------------------------------------------------------------------------------------------
# The execution forms: each maps (x, weight (E, Cout, Cin/g, kh, kw), bias (E, Cout) or None,
# r (B, E)) to the output, for the geometry in ``spec``.


def mix(r: Tensor, bank: Tensor) -> Tensor:
    """``sum_e r[b, e] bank[e]`` for every example: ``(B, *bank.shape[1:])``."""
    return (r @ bank.reshape(bank.shape[0], -1)).reshape(r.shape[0], *bank.shape[1:])


def _mixed_bias(r: Tensor, bias: Tensor | None) -> Tensor | None:
    return None if bias is None else r @ bias


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias[:, :, None, None]


def _loop(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    outputs = []
    for b in range(x.shape[0]):
        kernel = torch.einsum("e,e...->...", r[b], weight)
        mixed = None if bias is None else r[b] @ bias
        outputs.append(spec.conv2d(x[b : b + 1], kernel, mixed))
    return torch.cat(outputs)


def _grouped(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    batch = x.shape[0]
    kernels = mix(r, weight).reshape(-1, *weight.shape[2:])
    mixed = _mixed_bias(r, bias)
    folded = x.reshape(1, -1, *x.shape[2:])
    y = spec.conv2d(
        folded, kernels, None if mixed is None else mixed.reshape(-1), batch * spec.groups
    )
    return y.reshape(batch, spec.out_channels, *y.shape[2:])


def _expert_sum(
    spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor
) -> Tensor:
    experts, cout = weight.shape[:2]
    g = spec.groups
    # Output channels ordered (group, expert, channel in group) so that a grouped conv applies.
    stacked = weight.reshape(experts, g, cout // g, *weight.shape[2:]).transpose(0, 1)
    y = spec.conv2d(x, stacked.reshape(experts * cout, *weight.shape[2:]), None)
    batch, _, height, width = y.shape  # explicit sizes: no -1 for export to solve for
    y = y.reshape(batch, g, experts, (cout // g) * height * width)
    y = (r[:, None, None, :] @ y).squeeze(2).reshape(batch, cout, height, width)
    return _add_bias(y, _mixed_bias(r, bias))


def _bmm(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    g, cout = spec.groups, spec.out_channels
    kernels = mix(r, weight).reshape(-1, g, cout // g, weight[0, 0].numel())
    x = spec.pad_input(x)
    if spec.kernel_size == (1, 1):
        columns = x[:, :, :: spec.stride[0], :: spec.stride[1]]
        height, width = columns.shape[2:]
    else:
        height, width = (
            (size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(x.shape[2:], spec.kernel_size, spec.stride, spec.dilation)
        )
        columns = F.unfold(x, spec.kernel_size, spec.dilation, 0, spec.stride)
    columns = columns.reshape(-1, g, kernels.shape[-1], height * width)
    y = (kernels @ columns).reshape(-1, cout, height, width)
    return _add_bias(y, _mixed_bias(r, bias))


def _taps(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    batch, g, cout = x.shape[0], spec.groups, spec.out_channels
    cin_g, (kh, kw) = weight.shape[2], spec.kernel_size
    # (kh * kw, B * g, Cout/g, Cin/g): one contiguous kernel matrix per tap, example and group
    kernels = mix(r, weight).reshape(batch * g, cout // g, cin_g, kh * kw).permute(3, 0, 1, 2)
    x = spec.pad_input(x)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    height = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            window = x[
                :,
                :,
                i * dh : i * dh + sh * (height - 1) + 1 : sh,
                j * dw : j * dw + sw * (width - 1) + 1 : sw,
            ].reshape(batch * g, cin_g, height * width)
            tap = kernels[i * kw + j]
            y = torch.bmm(tap, window) if y is None else torch.baddbmm(y, tap, window)
    y = y.reshape(batch, cout, height, width)  # type: ignore[union-attr]
    return _add_bias(y, _mixed_bias(r, bias))


def _triton(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    from ..kernels.condconv import condconv_triton

    return condconv_triton(spec, x, weight, bias, r)


#: Measured choices of ``impl="auto"`` (see :meth:`CondConv2d._measured_form`), keyed by
#: device, dtype, geometry and input shape: a performance cache like cuDNN's, not model state.
_MEASURED_FORMS: dict[tuple, tuple[str, bool | None]] = {}

_FORM_FUNCTIONS = {
    "loop": _loop,
    "grouped": _grouped,
    "expert_sum": _expert_sum,
    "bmm": _bmm,
    "taps": _taps,
    "triton": _triton,
}


#: Forms that cannot run on an empty batch (a Python loop, ``B * groups`` conv groups, a
#: kernel grid over ``B``).
_BATCH_DEPENDENT = ("loop", "grouped", "triton")


def _batch_independent_form(spec: ConvSpec) -> str:
    return "bmm" if spec.kernel_size == (1, 1) else "expert_sum"


def _empty_batch(x: Tensor) -> bool:
    return not _exporting() and x.shape[0] == 0


def _exporting() -> bool:
    return (
        torch.compiler.is_compiling()
        or getattr(torch.compiler, "is_exporting", lambda: False)()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


def export_form(spec: ConvSpec, weight: Tensor) -> str:
    """The form a traced, compiled or exported layer runs (see :func:`choose_form`)."""
    if spec.kernel_size == (1, 1):
        return "bmm"
    return "expert_sum" if weight.shape[2] == 1 else "taps"


def choose_form(spec: ConvSpec, x: Tensor, weight: Tensor, needs_grad: bool) -> str:
    """The form ``impl="auto"`` runs for this call (a small heuristic, see below).

    * Traced, compiled or exported: plain batch-independent ops (a dynamic batch exports;
      the batch-folded forms do not): ``"bmm"`` for 1x1 kernels, ``"taps"`` for kxk (the
      conv's MACs), ``"expert_sum"`` for depthwise kxk (``Cin/groups == 1``): there every exact
      form is a chain of ``kh * kw`` memory-bound passes, which measured 1.3-2.5x slower in
      onnxruntime than one depthwise conv to ``E * C`` channels (``benchmarks/NOTES.md``).
    * Depthwise (``groups == Cin``): ``"grouped"``: the folded conv is a depthwise conv too.
    * On CUDA with Triton, floating inputs, ``Cin/groups >= 16`` and no gradient needed:
      ``"triton"`` (the layer then measures it against the PyTorch forms when
      ``torch.backends.cudnn.benchmark`` is on, see ``CondConv2d._measured_form``).
    * CPU inference with kxk kernels: ``"loop"``: oneDNN runs the per-example convs about as
      efficiently as one batched conv, 1.1-1.3x faster than the folded grouped conv
      (``benchmarks/RESULTS.md``); its host overhead is negligible next to CPU conv times.
    * Otherwise (training on GPU, CPU): ``"bmm"`` for 1x1 kernels, ``"grouped"`` for kxk
      (cuDNN and oneDNN run grouped convs well; unfold + bmm costs memory).
    """
    one_by_one = spec.kernel_size == (1, 1)
    if _exporting():
        return export_form(spec, weight)
    if spec.groups == spec.in_channels and spec.groups > 1:
        return "grouped"
    if (
        x.is_cuda
        and not needs_grad
        and spec.in_channels // spec.groups >= 16
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and triton_usable(x, weight)
    ):
        return "triton"
    if one_by_one:
        return "bmm"
    return "loop" if x.device.type == "cpu" and not needs_grad else "grouped"


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
    An empty batch runs a batch-independent form (``"loop"``, ``"grouped"`` and ``"triton"``
    have nothing to launch) and gives an empty output of the right shape.
    """
    _check_impl(impl)
    check_routing_weights(routing_weights, x.shape[0], weight.shape[0])
    if impl in _BATCH_DEPENDENT and _empty_batch(x):
        impl = _batch_independent_form(spec)
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, routing_weights)
        )
        impl = choose_form(spec, x, weight, needs_grad)
    return _FORM_FUNCTIONS[impl](spec, x, weight, bias, routing_weights)


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
        if _empty_batch(x):  # nothing to launch or measure; every form gives the same
            form, premix = _batch_independent_form(self.spec), None
        else:
            form, premix = self._resolve(x, routing_weights)
        return self._run(form, premix, x, routing_weights)

    def _needs_grad(self, x: Tensor, routing_weights: Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [x, *self.parameters()]
        if routing_weights is not None:
            tensors.append(routing_weights)
        return any(t.requires_grad for t in tensors)

    def _resolve(self, x: Tensor, routing_weights: Tensor | None) -> tuple[str, bool | None]:
        """The form to run (and, for ``"triton"``, whether to premix; None: its heuristic).

        Traced, compiled or exported, the batch-dependent forms (``"loop"``, ``"grouped"``)
        and the opaque kernel (``"triton"``) are replaced by the export-friendly choice of
        :func:`choose_form` (all forms are exact), so a deployed layer exports too.
        """
        if self.impl != "auto":
            if self.impl in ("loop", "grouped", "triton") and _exporting():
                return choose_form(self.spec, x, self.weight, True), None
            return self.impl, None
        form = choose_form(self.spec, x, self.weight, self._needs_grad(x, routing_weights))
        if form == "triton" and torch.backends.cudnn.benchmark:
            return self._measured_form(x, routing_weights)
        return form, None

    def _run(
        self, form: str, premix: bool | None, x: Tensor, routing_weights: Tensor | None
    ) -> Tensor:
        bias = self.bias if self.bias_per_expert else None
        if routing_weights is None and form == "triton" and self._routing_in_kernel(x):
            from ..kernels.condconv import condconv_triton

            fc = self.routing.fc
            y = condconv_triton(
                self.spec, x, self.weight, bias, None, premix, routing=(fc.weight, fc.bias)
            )
        else:
            r = self.routing_weights(x) if routing_weights is None else routing_weights
            r = r.to(self.weight.dtype)
            if form == "triton":
                from ..kernels.condconv import condconv_triton

                y = condconv_triton(self.spec, x, self.weight, bias, r, premix)
            else:
                y = condconv2d(self.spec, x, self.weight, bias, r, form)
        if self.bias is not None and not self.bias_per_expert:
            y = _add_bias(y, self.bias[None])
        return y

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
        same switch as cuDNN's own algorithm search). Candidates: the fused kernel mixing in
        registers and premixed, the batch-folded grouped conv, and ``"bmm"`` (1x1) or
        ``"expert_sum"`` (kxk). The cache is a per-process performance cache, not model state.
        """
        key = (
            x.device,
            x.dtype,
            self.spec,
            tuple(x.shape),
            x.is_contiguous(),
            self.num_experts,
            self.bias is not None,
            routing_weights is None and self._routing_in_kernel(x),
        )
        choice = _MEASURED_FORMS.get(key)
        if choice is not None:
            return choice
        if torch.cuda.is_current_stream_capturing():
            return "triton", None
        other = "bmm" if self.spec.kernel_size == (1, 1) else "expert_sum"
        candidates = [("triton", False), ("triton", True), ("grouped", None), (other, None)]
        timings = []
        for form, premix in candidates:
            try:
                for _ in range(2):  # warm-up (and Triton's autotuning on the first call)
                    self._run(form, premix, x, routing_weights)
            except Exception as error:  # a candidate that cannot run here is not chosen
                log.warning("CondConv2d: form %s (premix=%s) failed: %s", form, premix, error)
                timings.append(math.inf)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                self._run(form, premix, x, routing_weights)
            end.record()
            end.synchronize()
            timings.append(start.elapsed_time(end))
        choice = candidates[min(range(len(candidates)), key=timings.__getitem__)]
        _MEASURED_FORMS[key] = choice
        return choice

    def inference_form(self, device: torch.device | str | None = None) -> str:
        """The form :meth:`deploy` fixes: ``impl`` if set, else the eval-mode choice on ``device``.

        The rule follows :func:`choose_form` for an eval forward without gradient, with the
        shape-dependent choice made for this layer's geometry (not per batch): ``"triton"``
        on CUDA with Triton for non-depthwise layers, ``"grouped"`` for depthwise ones, and on
        CPU ``"bmm"`` for 1x1 and ``"grouped"`` for kxk kernels.
        """
        if self.impl != "auto":
            return self.impl
        device = torch.device(device) if device is not None else self.weight.device
        probe = torch.empty(0, device=device, dtype=self.weight.dtype)
        s = self.spec
        if s.groups == s.in_channels and s.groups > 1:
            return "grouped"
        if (
            probe.is_cuda
            and s.in_channels // s.groups >= 16
            and probe.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and triton_usable(probe)
        ):
            return "triton"
        return "bmm" if s.kernel_size == (1, 1) else "grouped"

    def deploy(self, impl: str | None = None) -> CondConv2d:
        """An eval-mode copy with its execution form fixed (the layer stays dynamic).

        CondConv has no static equivalent: the kernel depends on the input. The copy keeps the
        weights and routing; its ``impl`` is ``impl`` if given, else :meth:`inference_form`
        (so it no longer re-decides per call). When traced, compiled or exported the layer
        runs :func:`export_form` (``"bmm"`` for 1x1, ``"taps"`` for kxk, ``"expert_sum"`` for
        depthwise kxk) instead of a batch-dependent or Triton form, so a deployed model still
        exports with a dynamic batch.
        """
        form = self.inference_form() if impl is None else _check_impl(impl)
        if form == "auto":
            form = self.inference_form()
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
