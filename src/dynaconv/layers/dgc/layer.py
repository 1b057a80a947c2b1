"""DGC: dynamic group convolution.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020.

Per example, each of ``h`` heads chooses which input channels it reads. For an input ``x`` of
shape ``(B, Cin, H, W)`` (already normalised and activated: the pre-activation BN-ReLU belongs
to the network) and ``R = max(1, Cin // squeeze_rate)`` (or ``hidden_width``):

* saliency: ``s = GAP(x)`` ``(B, Cin)``; head ``i`` has ``g_i = relu(fc2_i(relu(fc1_i(s))))``
  with ``fc1_i: Cin -> R`` (no bias) and ``fc2_i: R -> Cin`` (bias, initialised to 1), so
  ``g`` is ``(B, h, Cin)``. It is computed in at least float32 (also under autocast or for a
  half-precision layer): which channels are kept is a hard decision; the convolution runs in
  the input's dtype;
* gating: with ``k_off`` inactive channels, every entry of ``g_i`` that is ``<=`` the
  ``k_off``-th smallest value of that example and head is zeroed (ties can zero more), the
  others stay: ``x_i = x * g_i`` (kept channels are scaled by their saliency);
* convolution: head ``i`` convolves ``x_i`` with its own dense kernel ``(Cout/h, Cin, kh, kw)``;
  its output ``j`` is output channel ``j*h + i`` (interleaved). ``weight`` holds all heads in
  that output order, ``(Cout, Cin, kh, kw)``: head ``i``'s kernel is ``weight[i::h]``;
* regulariser (``aux_loss()``): ``lasso = sum_i mean(g_i)`` over batch and channels, before
  the zeroing; the paper adds it to the loss with weight ``1e-5``;
* schedule (``set_progress(p)``): ``k_off = round(Cin (1 - gate_factor) 1.5 (p - 1/12))`` for
  ``1/12 < p < 3/4``, ``round(Cin (1 - gate_factor))`` for ``p >= 3/4`` and 0 before;
  ``gate_factor`` is the kept fraction.

Schedule state: ``k_off`` lives only in the buffer ``inactive_channels`` (saved, loaded, copied
by an EMA, identical on every DDP rank); there is no Python copy of it. Eager paths that need a
host int (the sparse, grouped and Triton forms: their shapes depend on ``k_off``) read the
buffer's value at each forward; traced graphs (``torch.compile``, ``torch.export``, the
TorchScript tracer) always run the dense masked form, which takes ``k_off`` as a tensor, so a
graph never specialises on a value that may change. ``set_progress``, ``load_state_dict``,
``torch.func.functional_call`` with another buffer, an in-place write to the buffer and an EMA
update therefore take effect at once, in every path and in ``kept_channels``, ``structure()``,
``count_macs``, ``extra_repr`` and ``deploy()``. The deployed
:class:`SparseDynamicGroupConv2d` (:mod:`dynaconv.layers.dgc.deployed`) keeps its kept count as fixed structure, like
``nn.Conv2d``'s ``groups``: deploy again after changing the schedule.

Converted layers (``from_conv``, used by :func:`dynaconv.convert`): the paper's networks put a
BN-ReLU in front of every DGC layer, so ``s`` is of order 1 and the reference initialisation
(fc1, fc2 kaiming-normal, fc2 bias 1) gives ``g = relu(1 + n)`` with ``n`` of order 1. A
converted network has no such normalisation, and ``n`` grows with the input (apart from the
bias, ``g`` is positively homogeneous in ``s``). Since ``E[relu(1 + n)] > 1`` for zero-mean
``n``, and the kept channels are the largest ``g``, a kept channel is scaled by more than 1 on
average, by more the larger the input, which compounds from layer to layer: with BatchNorm at
its initial running statistics (eval mode), torchvision's ResNets and DenseNets converted
with the reference layer output infinities and NaN. ``from_conv`` therefore uses
``saliency_mode="neutral"``, which does two things:

* the descriptor is normalised, ``s <- s / rms(s)`` over the channels of each example (the
  role the BN-ReLU plays in the paper's networks), so ``g`` does not depend on the scale of
  ``x`` and cannot compound with it, now or once trained;
* fc2's weight starts at 0 and its bias at ``1 + o_c`` with distinct offsets ``|o_c| < 1e-3``
  (a random permutation of evenly spaced values, so no ties); fc1 as the reference. At
  initialisation every saliency is ``1 + o_c`` whatever the input: the expected scale of a
  kept channel is 1 (to ``1e-3``), the converted layer is the conv it came from with its input
  channels rescaled by ``1 + o_c``, and the kept channels are fixed until the saliency
  generator learns. fc2 gets a gradient from the first step (``dL/dW2 = dL/dg relu(fc1 s)^T``
  is not zero), fc1 from the second, as with zero-initialised residual branches.

The layer's constructor, the papers' networks and :mod:`dynaconv.compat` keep
``saliency_mode="reference"`` (exactly the reference code).

Execution paths (``impl``, names as in :mod:`dynaconv.dispatch`; the math is in
:mod:`dynaconv.layers.dgc.functional`), all computing the same numbers:

* ``"masked"`` (also spelled ``"dense"``): the paper's masked form, a grouped convolution of
  the ``h`` gated copies of ``x``: no MACs saved;
* ``"bmm"`` (also spelled ``"sparse"``): per example and head, gather the ``Cin - k_off``
  highest-saliency channels and convolve only those with the matching kernel columns scaled
  by their saliency (``gate_factor`` of the dense MACs; plain PyTorch gather + unfold + bmm,
  exportable). Ties are reproduced exactly: the gathered channels that the reference zeroes
  get a scale of 0;
* ``"batch_grouped"`` (also spelled ``"grouped"``): the same sparse computation as one
  convolution with a group per example and head over the gathered channels (a transposed
  convolution for stride 1, so that the gathered kernels need no reordering); on CPU the
  fastest form for kernels larger than 1x1; not exportable with a dynamic batch (the number
  of groups depends on it);
* ``"head_grouped"``: the same sparse computation with the kept kernels gathered once per set
  of examples that keep the same channels, one ``h``-group convolution per set; at batch 1
  (one set) the kept MACs plus one gather of the kept input channels and kernels, the form
  closest to the limit (``nn.Conv2d(h*K, Cout, groups=h)``);
* ``"triton"``: the sparse computation as one fused implicit-GEMM kernel
  (:mod:`dynaconv.layers.dgc.kernels`). When a gradient is needed, the same kernel is the forward of
  an autograd function whose backward runs cuDNN convolutions head by head over batch
  chunks (dense-cost gradients, transient memory a quarter of ``x``); zero padding only;
* ``"auto"``: the fastest of the forms that can run the call, measured once per layer
  configuration (``k_off`` included), input shape, dtype, device and mode (training step or
  inference), cached (:class:`~dynaconv.layers.ChoosesForm`; the forms: :data:`FORMS`).
  Where measuring is off, :func:`rule`: on CUDA, ``"triton"`` (training with zero padding, and
  inference); on CPU, ``"masked"`` while no channel is inactive (``k_off = 0``: the sparse forms
  would compute every channel and gather too), then ``"bmm"`` for 1x1 stride-1 kernels and
  ``"batch_grouped"`` otherwise; on CUDA without Triton, ``"masked"`` for training and
  ``"bmm"`` for inference. ``"torch"``: the same without Triton. While being traced the layer
  runs ``"masked"`` whatever ``impl`` says (see "Schedule state": nothing recompiles as
  ``k_off`` grows); export :meth:`DynamicGroupConv2d.deploy`'s module for the sparse form. An
  empty batch runs a batch-independent form.

The lasso term is kept as a plain attribute set by each training-mode forward (not state: not
saved, dropped by copies), so ``aux_loss()`` belongs to the forward just run on that replica:
correct with DDP (each rank's own graph) and torch.compile (the attribute write is replayed).

Differences from the reference code: the BN-ReLU is not inside the layer; the hidden width is
``Cin // squeeze_rate`` for every ``Cin`` (the reference halves ``squeeze_rate`` when
``Cin < 80``: networks built like the paper's pass the halved rate, see
:func:`reference_squeeze_rate`), at least 1 (the reference makes a zero-width fc when
``Cin < squeeze_rate``, whose saliency is ``relu(fc2 bias)``: :mod:`dynaconv.compat` loads such
layers with ``hidden_width=0``); ``groups`` must be 1 (heads play that role); a bias is
allowed (added after the heads).

Shapes: input ``(B, Cin, H, W)`` -> output ``(B, Cout, H', W')`` as ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...dispatch import tracing, triton_preferred
from ...families import register_family
from ...spec import (
    check_choice,
    check_divisible,
    check_input,
    check_int,
    check_number,
    check_output_size,
)
from .._base import (
    Convention,
    ConversionSkipped,
    DynaConv2d,
    Form,
    FormCall,
    Forms,
    MacCount,
    Shape,
    check_progress,
    kaiming_uniform_,
)
from .deployed import SparseDynamicGroupConv2d
from .functional import (
    SALIENCY_MODES,
    SaliencyMode,
    dense_masked_conv,
    gate_dense,
    gathered_conv,
    grouped_gathered_conv,
    head_grouped_conv,
    kernel_rows,
    lasso,
    saliency,
    select_kept,
    triton_kernel_layout,
    zero_padding,
)
from .kernels import GatedHeadsConv, sparse_conv_triton

__all__ = ["DynamicGroupConv2d", "SparseDynamicGroupConv2d", "reference_squeeze_rate"]

#: ``impl`` names (canonical, then the older spellings, see :mod:`dynaconv.dispatch`).
Impl = Literal[
    "auto",
    "torch",
    "masked",
    "bmm",
    "batch_grouped",
    "head_grouped",
    "triton",
    "dense",
    "sparse",
    "grouped",
]

#: Half-width of the spread of the neutral initialisation's saliencies around 1.
NEUTRAL_SPREAD = 1e-3


def reference_squeeze_rate(in_channels: int, squeeze_rate: int) -> int:
    """The squeeze rate the reference code really uses: halved when ``in_channels < 80``."""
    return squeeze_rate // 2 if in_channels < 80 else squeeze_rate


def inactive_channels_at(progress: float, in_channels: int, gate_factor: float) -> int:
    """The schedule: number of inactive channels per example and head at ``progress``."""
    if progress >= 3.0 / 4:
        return round(in_channels * (1 - gate_factor))
    if progress > 1.0 / 12:
        return round(in_channels * (1 - gate_factor) * 3.0 / 2 * (progress - 1.0 / 12))
    return 0


def neutral_offsets(heads: int, channels: int, spread: float = NEUTRAL_SPREAD) -> Tensor:
    """``(heads, channels)`` distinct offsets in ``(-spread, spread)``, randomly placed.

    Each head's offsets are the evenly spaced values ``spread (2 (r + 1/2) / C - 1)`` for
    ``r = 0 .. C-1`` in a random order (``torch``'s generator): distinct, so that the
    saliencies ``1 + offset`` have no ties, and at most ``spread`` away from 1.
    """
    ranks = torch.stack([torch.randperm(channels) for _ in range(heads)]).to(torch.float64)
    return (spread * (2 * (ranks + 0.5) / channels - 1)).to(torch.float32)


def _check_options(
    in_channels: int, heads: Any, squeeze_rate: Any, gate_factor: Any, impl: Any
) -> None:
    _check_option_types(heads, squeeze_rate, gate_factor)
    FORMS.resolve(impl)
    if in_channels - round(in_channels * (1 - gate_factor)) < 1:
        raise ValueError(
            f"gate_factor={gate_factor} keeps no channel of in_channels={in_channels}: "
            "in_channels * gate_factor must round to at least 1"
        )


def _check_option_types(heads: Any, squeeze_rate: Any, gate_factor: Any) -> None:
    """``ValueError`` naming the option unless heads and squeeze_rate are positive ints and
    gate_factor is in (0, 1]."""
    check_int(heads, "heads")
    check_int(squeeze_rate, "squeeze_rate")
    check_number(
        gate_factor,
        "gate_factor (the kept fraction of input channels)",
        lambda fraction: 0.0 < fraction <= 1.0,
        "in (0, 1]",
    )


def _check_inactive(count: int, in_channels: int, name: str) -> int:
    """``count`` if it is a valid ``k_off`` (an int in ``[0, in_channels)``), else
    ``ValueError`` naming ``name``."""
    rule = f"an int in [0, in_channels) = [0, {in_channels})"
    return check_int(count, name, 0, rule, maximum=in_channels - 1)


def _run_masked(layer: DynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    gated = gate_dense(g, layer.inactive_channels)  # k_off as a tensor: traces
    return dense_masked_conv(x, layer.weight, gated, layer.spec, layer.heads)


def _run_bmm(layer: DynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    index, scale = select_kept(g, layer._inactive)
    return gathered_conv(x, layer.weight, index, scale, layer.spec, layer.heads)


def _run_batch_grouped(layer: DynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    index, scale = select_kept(g, layer._inactive)
    return grouped_gathered_conv(x, layer.weight, index, scale, layer.spec, layer.heads)


def _run_head_grouped(layer: DynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    index, scale = select_kept(g, layer._inactive)
    rows = kernel_rows(layer.weight, layer.heads, layer.spec)
    return head_grouped_conv(x, rows, index, scale, layer.spec, layer.heads)


def _run_triton(layer: DynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    inactive = layer._inactive
    if torch.is_grad_enabled() and (
        x.requires_grad or g.requires_grad or layer.weight.requires_grad
    ):
        gated = gate_dense(g, layer.inactive_channels)
        index = select_kept(g, inactive)[0]
        return GatedHeadsConv.apply(
            x, gated, layer.weight, index, layer.spec, layer.heads, True, layer.backward_chunks
        )
    kernel_weight = triton_kernel_layout(layer.weight, layer.heads)
    return sparse_conv_triton(x, kernel_weight, g, inactive, layer.spec, layer.heads)


def _triton_refuses(layer: DynamicGroupConv2d, call: FormCall) -> str | None:
    if call.needs_grad and zero_padding(layer.spec) is None:
        return (
            "impl='triton' trains only with zero padding (padding_mode='zeros', symmetric); "
            "use 'bmm' or 'masked'"
        )
    return None


def rule(layer: DynamicGroupConv2d, call: FormCall) -> list[str]:
    """DGC's forms in order of preference where nothing is measured (module docstring)."""
    x = call.x
    if triton_preferred(x):
        return ["triton", "masked"] if call.train else ["triton", "bmm"]
    if x.device.type == "cpu":
        pointwise = layer.spec.kernel_numel == 1 and layer.spec.stride == (1, 1)
        first = ["masked"] if layer._inactive == 0 else []
        if not call.train and x.shape[0] == 1:
            first.append("head_grouped")  # one static choice per head: the kept MACs
        return [*first, "bmm" if pointwise else "batch_grouped", "bmm", "masked"]
    return ["masked", "bmm"] if call.train else ["bmm", "masked"]


def _sparsity(layer: DynamicGroupConv2d) -> int:
    """``k_off`` in eighths of the channels (0 only for ``k_off = 0``): the part of a measured
    choice's key that the schedule moves. During the schedule's ramp ``k_off`` changes nearly
    every step; keyed on it exactly, every step measured anew (the demo's DGC run spent most of
    its first ~150 steps measuring). The forms' speeds change smoothly with ``k_off``."""
    inactive = layer._inactive
    return 0 if inactive == 0 else 1 + 8 * inactive // layer.spec.in_channels


#: DGC's execution forms (the declaration :class:`~dynaconv.layers.ChoosesForm` reads). The
#: gathered forms read ``k_off`` from the buffer as a host int, so traced graphs run
#: ``"masked"`` (the export form), which takes it as a tensor.
FORMS = Forms(
    forms={
        "masked": Form(_run_masked),
        "bmm": Form(_run_bmm, traceable=False),
        "batch_grouped": Form(_run_batch_grouped, batch_dependent=True, traceable=False),
        # One h-group conv per set of examples keeping the same channels (a host loop).
        "head_grouped": Form(_run_head_grouped, batch_dependent=True, traceable=False),
        "triton": Form(
            _run_triton,
            triton=True,
            batch_dependent=True,
            traceable=False,
            refuses=_triton_refuses,
        ),
    },
    rule=rule,
    export=lambda layer, x: "masked",
    key=lambda layer, x, *args: (layer.spec, layer.heads, layer.hidden, _sparsity(layer)),
)


@register_family("dgc")
class DynamicGroupConv2d(DynaConv2d):
    """Dynamic group convolution (drop-in for ``nn.Conv2d`` with ``groups=1``).

    Args: those of ``nn.Conv2d`` (``groups`` must be 1), plus
        heads: number of heads (``out_channels`` must be divisible by it), default 4.
        squeeze_rate: hidden width of the saliency generators is ``max(1, Cin // squeeze_rate)``.
        gate_factor: kept fraction of the input channels at the end of the schedule (0.25).
        impl: ``"auto"``, ``"torch"``, ``"masked"``, ``"bmm"``, ``"batch_grouped"``,
            ``"head_grouped"`` or ``"triton"`` (older spellings ``"dense"``, ``"sparse"``,
            ``"grouped"``; see the module docstring).
        saliency_mode: ``"reference"`` (the paper's saliency generator and initialisation) or
            ``"neutral"`` (the descriptor normalised to unit RMS, every saliency starting at
            ``1 +- 1e-3``; what ``from_conv`` uses, see the module docstring).
        hidden_width: the saliency generators' hidden width ``R``; default
            ``max(1, Cin // squeeze_rate)``. 0 is allowed (the saliency is then
            ``relu(fc2 bias)``), for layers loaded from the reference code.

    ``weight`` is the dense kernel of all heads (output channel ``j*h + i`` from head ``i``).
    ``inactive_channels`` (buffer) is the current ``k_off``; ``aux_loss()`` is the lasso term of
    the last training-mode forward (a zero tensor before any).
    """

    title = "DGC"
    conv_groups = "one"
    forms = FORMS
    example_options = MappingProxyType({"heads": 4, "gate_factor": 0.25, "squeeze_rate": 4})
    example_aux_loss_weight = 1e-5  # docs/methods.md: DGC's lasso at 1e-5

    def structure_maps(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The mean saliency per input channel (the heads' recorded ``Cin``-wide outputs)."""
        rows = [
            v.mean(0) for v in outputs.values() if v.dim() == 2 and v.shape[1] == self.in_channels
        ]
        if not rows:
            return {}
        return {"mean channel saliency (input channel usage)": torch.stack(rows).mean(0)}

    def _init_family(
        self,
        device: Any,
        dtype: Any,
        *,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.25,
        impl: Impl = "auto",
        saliency_mode: SaliencyMode = "reference",
        hidden_width: int | None = None,
    ) -> None:
        s = self.spec
        in_channels, out_channels, groups, bias = s.in_channels, s.out_channels, s.groups, s.bias
        if groups != 1:
            raise ValueError(f"groups must be 1 for DGC (the heads replace groups), got {groups}")
        _check_options(in_channels, heads, squeeze_rate, gate_factor, impl)
        check_choice(saliency_mode, "saliency_mode", SALIENCY_MODES)
        if hidden_width is not None:
            check_int(hidden_width, "hidden_width", 0, "None or an int >= 0")
        check_divisible(out_channels, "out_channels", heads, "heads")
        factory = {"device": device, "dtype": dtype}
        self.heads = heads
        self.squeeze_rate = squeeze_rate
        self.gate_factor = float(gate_factor)
        self.impl = impl
        self.saliency_mode = saliency_mode
        hidden = max(1, in_channels // squeeze_rate) if hidden_width is None else hidden_width
        self.hidden = hidden
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.spec.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, in_channels, **factory))
        self.fc2_weight = nn.Parameter(torch.empty(heads, in_channels, hidden, **factory))
        self.fc2_bias = nn.Parameter(torch.empty(heads, in_channels, **factory))
        # k_off: the only copy of the schedule state (no Python mirror, see the module docstring).
        self.register_buffer("inactive_channels", torch.zeros((), dtype=torch.long, device=device))
        self._last_lasso: Tensor | None = None
        #: Batch chunks of the Triton training path's backward (memory/launches trade-off).
        self.backward_chunks = 2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.spec.in_channels * self.spec.kernel_numel
        kaiming_uniform_(self.weight, fan_in)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        with torch.no_grad():  # kaiming-normal of each head's Linear layers (fc1 always)
            self.fc1_weight.normal_(0.0, math.sqrt(2.0 / self.spec.in_channels))
            if self.saliency_mode == "reference":  # fc2 kaiming-normal, bias 1
                if self.hidden:
                    self.fc2_weight.normal_(0.0, math.sqrt(2.0 / self.hidden))
                self.fc2_bias.fill_(1.0)
            else:  # "neutral": g = 1 + a distinct offset in (-eps, eps) per channel
                self.fc2_weight.zero_()
                self.fc2_bias.copy_(1.0 + neutral_offsets(self.heads, self.spec.in_channels))

    # ---------------------------------------------------------------------------- schedule
    @property
    def _inactive(self) -> int:
        """``k_off`` read from the buffer ``inactive_channels`` (validated; eager mode only)."""
        return _check_inactive(
            int(self.inactive_channels), self.spec.in_channels, "inactive_channels"
        )

    @property
    def kept_channels(self) -> int:
        """Channels each head reads per example now (``Cin - k_off``, from the buffer)."""
        return self.spec.in_channels - self._inactive

    def set_inactive_channels(self, count: int) -> None:
        """Set ``k_off`` directly (``set_progress`` computes it from the schedule)."""
        _check_inactive(count, self.spec.in_channels, "inactive channel count")
        with torch.no_grad():
            self.inactive_channels.fill_(count)

    def set_progress(self, progress: float) -> None:
        progress = check_progress(progress)
        self.set_inactive_channels(
            inactive_channels_at(progress, self.spec.in_channels, self.gate_factor)
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _check_inactive(
            int(self.inactive_channels), self.spec.in_channels, f"{prefix}inactive_channels"
        )

    # ---------------------------------------------------------------------------- forward
    def saliency(self, x: Tensor) -> Tensor:
        """``(B, h, Cin)`` saliencies of ``x`` (before gating)."""
        return saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        if not tracing():
            check_output_size(x, self.spec, type(self).__name__)
        g = self.saliency(x)
        if self.training:
            # The lasso term of this forward, read by aux_loss(): a plain attribute (not
            # schedule state), so every DDP rank / compiled graph uses its own forward's value.
            self._last_lasso = lasso(g)
        out = self.run_form(x, g)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # The last lasso term is part of an autograd graph: copies and pickles drop it.
        state = self.__dict__.copy()
        state["_last_lasso"] = None
        return state

    def aux_loss(self) -> Tensor:
        """``lasso`` of the last training-mode forward (zero before any)."""
        if self._last_lasso is None:
            return super().aux_loss()
        return self._last_lasso

    # ---------------------------------------------------------------------------- contract
    def deploy(self) -> SparseDynamicGroupConv2d:
        """The sparse inference module (gathers ``Cin - k_off`` channels per head)."""
        return SparseDynamicGroupConv2d.from_layer(self)

    @classmethod
    def _conversion(
        cls,
        conv: nn.Conv2d,
        *,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.25,
        impl: Impl = "auto",
        saliency_mode: SaliencyMode = "neutral",
    ) -> dict[str, Any]:
        """A DGC layer with ``conv``'s kernel (every head keeps its rows of it).

        ``saliency_mode="neutral"`` (the default here) normalises the saliency descriptor and
        starts every saliency at ``1 +- 1e-3`` whatever the input, so the layer starts as
        ``conv`` (module docstring, "Converted layers"); ``"reference"`` gives the paper's
        layer.
        """
        _check_option_types(heads, squeeze_rate, gate_factor)  # before any arithmetic
        if conv.out_channels % heads:
            raise ConversionSkipped(
                f"out_channels={conv.out_channels} not divisible by heads={heads}"
            )
        if conv.in_channels - round(conv.in_channels * (1 - gate_factor)) < 1:
            raise ConversionSkipped(
                f"in_channels={conv.in_channels} too few to keep a fraction {gate_factor}"
            )
        return {
            "heads": heads,
            "squeeze_rate": squeeze_rate,
            "gate_factor": gate_factor,
            "impl": impl,
            "saliency_mode": saliency_mode,
        }

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        self.weight.copy_(conv.weight)
        if conv.bias is not None:
            self.bias.copy_(conv.bias)

    def _saliency_macs(self, batch: int) -> int:
        return batch * self.heads * 2 * self.spec.in_channels * self.hidden

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        """Dense: the full conv of every head + the saliency FCs. Active: each head convolves
        ``Cin - k_off`` channels (the current ``k_off``) + the saliency FCs.

        ``convention="reference"``: what the reference counter (``utils.measure_model`` of the
        DGC code) counts. Worked out from its totals for DyDenseNet-86 (CIFAR, 71,037,118) and
        DyResNet-18 (224 px, 890,396,782.4), which it reproduces exactly: per layer, the head
        convs at ``gate_factor`` of their dense MACs (the fraction, not the current ``k_off``,
        hence the non-integer total), the global average pool (one op per input element), and
        per head ``fc1`` (``Cin R``), its ReLU (``R``), ``fc2`` with bias (``R Cin + Cin``), its
        ReLU (``Cin``) and one more op per saliency (``Cin``, the gating). The layer's BN-ReLU
        (its ReLU: one op per input element) lives in the network, whose ``nn.ReLU`` the
        counter counts. Dense: the same with the full conv.
        """
        if convention == "reference":
            return self._reference_macs(input_shape, output_shape)
        conv = self.spec.dense_macs(output_shape)
        fcs = self._saliency_macs(int(output_shape[0]))
        active = conv // self.spec.in_channels * self.kept_channels
        return MacCount(conv + fcs, active + fcs)

    def _reference_macs(self, input_shape: Shape, output_shape: Shape) -> MacCount:
        batch = int(input_shape[0])
        cin, hidden = self.spec.in_channels, self.hidden
        conv = self.spec.dense_macs(output_shape)
        pool = math.prod(int(s) for s in input_shape)
        per_head = cin * hidden + hidden + hidden * cin + cin + cin + cin
        extra = pool + batch * self.heads * per_head
        active = conv * self.gate_factor + extra
        return MacCount(conv + extra, int(active) if float(active).is_integer() else active)

    def structure(self) -> str:
        return (
            f"{self.heads} heads, {self.kept_channels}/{self.spec.in_channels} channels kept"
            f" (target {self.gate_factor:g})"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, heads={self.heads}, squeeze_rate={self.squeeze_rate}, "
            f"gate_factor={self.gate_factor:g}, inactive={int(self.inactive_channels)}, "
            f"impl={self.impl!r}"
        )
