"""The deployed DGC layer: only the kept channels of each example and head are computed.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020. :meth:`dynaconv.layers.dgc.DynamicGroupConv2d.deploy` returns a
:class:`SparseDynamicGroupConv2d` with the layer's weights, saliency generators and current
kept count (the math: :mod:`dynaconv.functional.dgc`; its execution forms: :data:`FORMS`, with the
weight layouts they read, :func:`weight_layout`, cached per module by
:meth:`SparseDynamicGroupConv2d.layout`; what a traced graph runs: :func:`traced_inference_form`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from ..dispatch import tracing, triton_preferred
from ..functional.dgc import (
    dense_masked_conv,
    gate_from_kept,
    gathered_conv,
    grouped_gathered_conv,
    head_grouped_conv,
    head_kernels,
    kernel_rows,
    runs_transposed,
    saliency,
    select_kept,
    triton_kernel_layout,
)
from ..kernels.dgc import sparse_conv_triton
from ._base import (
    ChoosesForm,
    Convention,
    ConvSpec,
    Form,
    FormCall,
    Forms,
    MacCount,
    Shape,
    check_input,
    check_output_size,
)

if TYPE_CHECKING:
    from .dgc import DynamicGroupConv2d

__all__ = [
    "SparseDynamicGroupConv2d",
    "run_inference_form",
    "traced_inference_form",
]

SaliencyMode = Literal["reference", "neutral"]
_SALIENCY_MODES = ("reference", "neutral")

#: The weight layouts the forms read (:func:`weight_layout`).
Layout = Literal["rows", "head_kernels", "triton"]


def weight_layout(weight: Tensor, heads: int, spec: ConvSpec, layout: Layout) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` laid out for a form: ``"rows"``
    (:func:`~dynaconv.functional.dgc.kernel_rows`: ``"head_grouped"``, ``"batch_grouped"``),
    ``"head_kernels"`` (head-major, contiguous: ``"masked"``) or ``"triton"``."""
    if layout == "rows":
        return kernel_rows(weight, heads, spec)
    if layout == "head_kernels":
        return head_kernels(weight, heads).contiguous()
    return triton_kernel_layout(weight, heads)


def run_inference_form(
    form: str,
    x: Tensor,
    g: Tensor,
    inactive: int,
    weight: Tensor,
    spec: ConvSpec,
    heads: int,
    layout: Callable[[Layout], Tensor] | None = None,
) -> Tensor:
    """One exact inference form of the gated convolution (no bias), ``form`` canonical.

    ``g`` ``(B, h, Cin)`` the saliencies, ``inactive`` = ``k_off``; ``layout(name)`` returns
    :func:`weight_layout` of ``weight`` (a deployed module caches them; by default they are
    derived on each call). Every form computes the same numbers as the masked reference.
    """
    if layout is None:

        def layout(name: Layout) -> Tensor:
            return weight_layout(weight, heads, spec, name)

    if form == "triton":
        return sparse_conv_triton(x, layout("triton"), g, inactive, spec, heads)
    index, scale = select_kept(g, inactive)
    if form == "masked":
        gated = gate_from_kept(g, index, scale)
        return dense_masked_conv(x, weight, gated, spec, heads, layout("head_kernels"))
    if form == "head_grouped":
        return head_grouped_conv(x, layout("rows"), index, scale, spec, heads)
    if form == "batch_grouped":
        return grouped_gathered_conv(x, weight, index, scale, spec, heads, layout("rows"))
    return gathered_conv(x, weight, index, scale, spec, heads)


#: Output positions from which a traced batch-1 graph gathers the kept kernels (else it runs
#: the masked form): transposed (stride-1 kxk, 1x1) and plain (strided kxk, whose gathered
#: kernels need one more reordering copy) convolutions. Measured in onnxruntime
#: (``benchmarks/NOTES.md``): the gathered form is 0.80-0.86x of the dense conv on 8x8 to
#: 32x32 maps at stride 1, 1.54x on 4x4 (masked 1.30x); strided, 1.22x at 16x16 output
#: (masked 1.35x), 1.41x / 3.42x at 8x8 / 4x4 (masked 1.26x / 1.35x).
TRACED_GATHER_MIN_POSITIONS = {"transposed": 64, "plain": 256}


def traced_inference_form(x: Tensor, spec: ConvSpec) -> str:
    """The form a traced, compiled or exported inference graph runs for ``impl="auto"``.

    A static batch of 1: ``"head_grouped"`` (a Gather of the kept kernel rows and one
    ``h``-group ConvTranspose/Conv node) where the output map has at least
    :data:`TRACED_GATHER_MIN_POSITIONS` positions or the kernel is 1x1, else ``"masked"``
    (constant weights, which onnxruntime pre-packs: faster where gathering the kept kernels
    costs more than the MACs it saves). Other batches, a dynamic one included:
    ``"masked"`` (batch-independent plain ops).
    """
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    if not (isinstance(batch, int) and batch == 1):
        return "masked"
    if spec.kernel_size == (1, 1) or not (isinstance(height, int) and isinstance(width, int)):
        return "head_grouped"
    out_height, out_width = spec.output_size(height, width)
    kind = "transposed" if runs_transposed(spec) else "plain"
    return (
        "head_grouped" if out_height * out_width >= TRACED_GATHER_MIN_POSITIONS[kind] else "masked"
    )


def _inactive(module: SparseDynamicGroupConv2d) -> int:
    return module.spec.in_channels - module.kept


def _run(form: str) -> Callable[[SparseDynamicGroupConv2d, Tensor, Tensor], Tensor]:
    def run(module: SparseDynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
        return run_inference_form(
            form, x, g, _inactive(module), module.weight, module.spec, module.heads, module.layout
        )

    run.__name__ = f"_run_{form}"
    return run


def _rule(module: SparseDynamicGroupConv2d, call: FormCall) -> list[str]:
    """Without measuring: the Triton kernel on CUDA; on CPU the head-grouped conv at batch 1,
    else ``"bmm"`` for 1x1 stride-1 kernels and the batch-grouped conv otherwise; ``"bmm"``
    elsewhere."""
    if triton_preferred(call.x):
        return ["triton", "bmm"]
    if call.x.device.type == "cpu":
        first = ["head_grouped"] if call.x.shape[0] == 1 else []
        pointwise = module.spec.kernel_numel == 1 and module.spec.stride == (1, 1)
        return [*first, "bmm"] if pointwise else [*first, "batch_grouped", "bmm"]
    return ["bmm"]


#: The deployed DGC layer's execution forms (the declaration
#: :class:`~dynaconv.layers.ChoosesForm` reads). Where each is fastest on the CPU:
#: ``"head_grouped"`` at batch 1 (the kept MACs plus one gather of the kept kernels, the limit);
#: ``"batch_grouped"`` on large maps at batch > 1; ``"masked"`` on small maps at batch > 1,
#: where copying a kernel per example costs more than the saved MACs; ``"bmm"`` mostly for 1x1
#: kernels (with larger kernels its unfold copies the input ``kh*kw`` times), but measured
#: for every kernel: a strided 3x3 at batch 1 read it fastest (``benchmarks/NOTES.md``), and
#: where it is far off the measurement drops it after two calls.
#: ``kept`` is fixed structure, so the gathered ``"bmm"`` and ``"masked"`` forms trace and export; a traced graph runs :func:`traced_inference_form` (``"head_grouped"`` at
#: a static batch of 1, where the set of kept channels is one per head).
FORMS = Forms(
    forms={
        "head_grouped": Form(_run("head_grouped"), batch_dependent=True, traceable=False),
        "batch_grouped": Form(_run("batch_grouped"), batch_dependent=True, traceable=False),
        "masked": Form(_run("masked")),
        "bmm": Form(_run("bmm")),
        "triton": Form(_run("triton"), triton=True, batch_dependent=True, traceable=False),
    },
    rule=_rule,
    export=lambda module, x: traced_inference_form(x, module.spec),
    key=lambda module, x, *args: (module.spec, module.heads, module.kept, module.fc1_weight.shape),
)


class SparseDynamicGroupConv2d(ChoosesForm, nn.Module):
    """The deployed DGC layer: computes only the kept channels of each example and head.

    Same numbers as :class:`DynamicGroupConv2d` in eval mode, at ``K/Cin`` of the conv MACs
    (``K = Cin - k_off``). ``impl``: ``"auto"``, ``"torch"``, ``"head_grouped"``,
    ``"batch_grouped"``, ``"masked"``, ``"bmm"`` or ``"triton"`` (or an older spelling).
    ``"auto"`` measures the forms that can run once per input shape and runs the fastest
    (:class:`~dynaconv.layers.ChoosesForm`; :data:`FORMS`); traced, compiled or exported it
    runs :func:`traced_inference_form`. ``"torch"``: the same without Triton.

    ``kept`` (``K``) is fixed structure, like ``nn.Conv2d``'s ``groups``: a plain int, not
    state (not in the state dict), read by every path, traced ones included (their shapes
    depend on it). It is the layer's count when :meth:`DynamicGroupConv2d.deploy` ran.
    """

    forms = FORMS

    def __init__(
        self,
        spec: ConvSpec,
        heads: int,
        kept: int,
        weight: Tensor,
        bias: Tensor | None,
        fc1_weight: Tensor,
        fc2_weight: Tensor,
        fc2_bias: Tensor,
        impl: str = "auto",
        saliency_mode: SaliencyMode = "reference",
    ) -> None:
        super().__init__()
        if saliency_mode not in _SALIENCY_MODES:
            raise ValueError(
                f"saliency_mode must be one of {_SALIENCY_MODES}, got {saliency_mode!r}"
            )
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= spec.in_channels:
            raise ValueError(
                f"kept must be an int in [1, in_channels={spec.in_channels}], got {kept!r}"
            )
        self.spec = spec
        self.heads = heads
        self.kept = kept
        self.impl = impl
        self.saliency_mode = saliency_mode
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.fc1_weight = nn.Parameter(fc1_weight.detach().clone(), requires_grad=False)
        self.fc2_weight = nn.Parameter(fc2_weight.detach().clone(), requires_grad=False)
        self.fc2_bias = nn.Parameter(fc2_bias.detach().clone(), requires_grad=False)
        self._layouts: dict[Layout, tuple[tuple[Any, ...], Tensor]] = {}

    def layout(self, name: Layout) -> Tensor:
        """``weight`` in the layout a form reads (:func:`weight_layout`). Derived from
        ``weight`` on first use and cached (not state) while ``weight`` is the same tensor,
        unchanged in place; so loading, ``functional_call`` and in-place writes are followed.
        Traced graphs derive it in the graph (a constant there)."""
        weight = self.weight.detach()
        if tracing():
            return weight_layout(weight, self.heads, self.spec, name)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        cached = self._layouts.get(name)
        if cached is None or cached[0] != key:
            cached = (key, weight_layout(weight, self.heads, self.spec, name))
            self._layouts[name] = cached
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_layouts"] = {}  # a cache: copies and pickles derive their own
        return state

    @classmethod
    def from_layer(cls, layer: DynamicGroupConv2d) -> SparseDynamicGroupConv2d:
        # The training layer's masked form computes every channel: deploying keeps the
        # layer's explicit sparse form, or measures ("auto") otherwise.
        impl = layer.impl if layer.impl in FORMS.impls and layer.impl != "masked" else "auto"
        return cls(
            layer.spec,
            layer.heads,
            layer.kept_channels,
            layer.weight,
            layer.bias,
            layer.fc1_weight,
            layer.fc2_weight,
            layer.fc2_bias,
            impl,
            layer.saliency_mode,
        )

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        if not tracing():
            check_output_size(x, self.spec, type(self).__name__)
        g = saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )
        out = self.run_form(x, g)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def form(self, x: Tensor) -> str:
        """The form a call on ``x`` runs (measured now if ``"auto"`` has not yet; see
        :class:`~dynaconv.layers.ChoosesForm`)."""
        g = saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )
        return self.choose_form(x, g)

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        conv = self.spec.dense_macs(output_shape) // self.spec.in_channels * self.kept
        fcs = (
            int(output_shape[0]) * self.heads * 2 * self.spec.in_channels * self.fc1_weight.shape[1]
        )
        return MacCount(conv + fcs, conv + fcs)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, stride={s.stride}, "
            f"heads={self.heads}, kept={self.kept}, impl={self.impl!r}"
        )
