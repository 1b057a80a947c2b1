"""The deployed DGC layer: only the kept channels of each example and head are computed.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020. :meth:`dynaconv.layers.dgc.DynamicGroupConv2d.deploy` returns a
:class:`SparseDynamicGroupConv2d` with the layer's weights, saliency generators and current
kept count (the math: :mod:`dynaconv.layers.dgc.functional`; its execution forms: :data:`FORMS`, with the
weight layouts they read, :func:`weight_layout`, cached per module by
:meth:`SparseDynamicGroupConv2d.layout`; what a traced graph runs: :func:`traced_inference_form`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...dispatch import (
    tracing,
    triton_preferred,
)
from ...folding import fold_batchnorm
from ...spec import ConvSpec, check_choice, check_input, check_int, check_output_size
from .._base import (
    ChoosesForm,
    Convention,
    Form,
    FormCall,
    Forms,
    MacCount,
    Shape,
    tensor_version,
)
from . import cpu
from .functional import (
    SALIENCY_MODES,
    SaliencyMode,
    block_rows,
    dense_masked_conv,
    gate_from_kept,
    gather_width,
    gathered_conv,
    grouped_gathered_conv,
    head_blocked_conv,
    head_gemm_single,
    head_grouped_conv,
    head_kernels,
    kernel_rows,
    runs_transposed,
    saliency,
    select_kept,
    tap_rows,
    triton_kernel_layout,
)
from .kernels import sparse_conv_triton

__all__ = [
    "NCHWC_GATHER_MIN_POSITIONS",
    "SparseDynamicGroupConv2d",
    "nchwc_export",
    "padded_width",
    "run_inference_form",
    "traced_inference_form",
]

#: The weight layouts the forms read (:func:`weight_layout`).
Layout = Literal["rows", "tap_rows", "head_kernels", "triton", "cpu_kernel"]


def weight_layout(weight: Tensor, heads: int, spec: ConvSpec, layout: Layout) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` laid out for a form: ``"rows"``
    (:func:`~dynaconv.layers.dgc.functional.kernel_rows`: ``"head_grouped"``, ``"batch_grouped"``),
    ``"head_kernels"`` (head-major, contiguous: ``"masked"``), ``"triton"`` or ``"cpu_kernel"``
    (:func:`~dynaconv.layers.dgc.cpu.kernel_layout`)."""
    if layout == "cpu_kernel":
        return cpu.kernel_layout(weight, heads)
    if layout == "rows":
        return kernel_rows(weight, heads, spec)
    if layout == "tap_rows":
        return tap_rows(weight, heads)
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
    workspace: Callable[[tuple[int, ...], Tensor], Tensor] | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """One exact inference form of the gated convolution, ``form`` canonical; ``bias`` is
    added by the forms of :data:`ADDS_BIAS` only (the caller adds it after the others).

    ``g`` ``(B, h, Cin)`` the saliencies, ``inactive`` = ``k_off``; ``layout(name)`` returns
    :func:`weight_layout` of ``weight`` (a deployed module caches them; by default they are
    derived on each call); ``workspace(shape, like)``, where given, a reusable tensor of
    ``shape`` with ``like``'s dtype and device for the kernels ``"head_grouped"`` gathers at
    batch 1 when nothing needs a gradient (:func:`~dynaconv.layers.dgc.functional.head_grouped_conv`). Every
    form computes the same numbers as the masked reference.
    """
    if layout is None:

        def layout(name: Layout) -> Tensor:
            return weight_layout(weight, heads, spec, name)

    if form == "triton":
        return sparse_conv_triton(x, layout("triton"), g, inactive, spec, heads)
    if form == "cpu_kernel":
        keep = spec.in_channels - inactive
        return cpu.selected_conv_cpu(x, g, keep, layout("cpu_kernel"), spec, heads, bias)
    if form in ("head_grouped", "batch_grouped"):
        kept = spec.in_channels - inactive
        block = _blocked_width(x, spec, heads, kept) if form == "head_grouped" else None
        if block is not None:  # nchwc_export: padded groups, kernel in one transpose
            index, scale = select_kept(g, inactive, gather_width(kept, spec.in_channels, block))
            rows = block_rows(weight, heads, block)
            return head_blocked_conv(x, rows, index, scale, spec, heads)
        # Traced graphs gather the kept channels only: in onnxruntime the padded groups did
        # not pay (DyResNet-18 at batch 1: 1.07x of the dense twin against 1.04x).
        index, scale = select_kept(g, inactive, kept if tracing() else padded_width(spec, kept))
        if form == "head_grouped":
            differentiable = torch.is_grad_enabled() and (
                x.requires_grad or g.requires_grad or weight.requires_grad
            )
            reuse = workspace is not None and x.shape[0] == 1 and not differentiable
            if reuse and _gemm_at_batch_one(x, spec):
                rows = layout("tap_rows")
                space = workspace((heads * index.shape[-1], rows.shape[1]), rows)
                return head_gemm_single(x, rows, index, scale, spec, heads, space)
            rows = layout("rows")
            space = workspace((heads * index.shape[-1], *rows.shape[1:]), rows) if reuse else None
            return head_grouped_conv(x, rows, index, scale, spec, heads, space)
        return grouped_gathered_conv(x, weight, index, scale, spec, heads, layout("rows"))
    index, scale = select_kept(g, inactive)
    if form == "masked":
        gated = gate_from_kept(g, index, scale)
        return dense_masked_conv(x, weight, gated, spec, heads, layout("head_kernels"))
    return gathered_conv(x, weight, index, scale, spec, heads)


_NCHWC_EXPORT = threading.local()


class nchwc_export:
    """Within ``with nchwc_export(block):``, traced batch-1 ``"head_grouped"`` layers with
    kernels larger than 1x1 export for onnxruntime's blocked convolutions
    (:mod:`dynaconv.onnxruntime_nchwc`, ``export --onnxruntime-nchwc``): each head's kept
    channels padded to a multiple of ``block`` with channels of scale 0 (exact zeros) and the
    kernel gathered from :func:`~dynaconv.layers.dgc.functional.block_rows`
    (:func:`~dynaconv.layers.dgc.functional.head_blocked_conv`), where ``Cout/h`` is a
    multiple of ``block`` and the padded width fits in ``Cin`` (else the portable form). The
    graph stays a plain, correct ONNX graph; the padding only pays once its grouped
    convolution runs blocked. ``block``: a positive int (``ValueError`` otherwise)."""

    def __init__(self, block: int) -> None:
        self.block = check_int(block, "block")

    def __enter__(self) -> nchwc_export:
        self._previous = getattr(_NCHWC_EXPORT, "block", None)
        _NCHWC_EXPORT.block = self.block
        return self

    def __exit__(self, *exc: object) -> None:
        _NCHWC_EXPORT.block = self._previous


def _blocked_width(x: Tensor, spec: ConvSpec, heads: int, kept: int) -> int | None:
    """The block of :class:`nchwc_export` where it applies to this call, else None."""
    block = getattr(_NCHWC_EXPORT, "block", None)
    if block is None or not tracing() or spec.kernel_size == (1, 1):
        return None
    if not (isinstance(x.shape[0], int) and x.shape[0] == 1):  # a static batch of 1 only
        return None
    if (spec.out_channels // heads) % block:
        return None
    if gather_width(kept, spec.in_channels, block) % block:
        return None
    return block


#: Output positions up to which the batch-1 form runs as one batched matrix product
#: (:func:`~dynaconv.layers.dgc.functional.head_gemm_single`) instead of a grouped convolution.
#: Measured on the CPU (``benchmarks/NOTES.md``): 512 channels on 4x4 maps 0.66-0.85x of the
#: dense conv against 0.85-1.14x; 256 channels on 8x8 maps 0.98x against 0.73x.
GEMM_MAX_POSITIONS = 16


def _gemm_at_batch_one(x: Tensor, spec: ConvSpec) -> bool:
    if spec.kernel_size == (1, 1):
        return False
    out_height, out_width = spec.output_size(x.shape[2], x.shape[3])
    return out_height * out_width <= GEMM_MAX_POSITIONS


def padded_width(spec: ConvSpec, kept: int) -> int:
    """The channels per head the grouped forms (``"head_grouped"``, ``"batch_grouped"``)
    gather: ``kept`` rounded up by :func:`~dynaconv.layers.dgc.functional.gather_width` for kernels
    larger than 1x1, the extra channels with scale 0 (exact zeros). Measured on the CPU
    (``benchmarks/NOTES.md``): a 4-group 3x3 conv with 29 channels per group took 1.06x of
    the dense 64-channel conv, with 32 channels 0.58x. 1x1 kernels run as matrix products,
    which do not need it. Eager only: traced graphs gather ``kept``."""
    if spec.kernel_size == (1, 1):
        return kept
    return gather_width(kept, spec.in_channels)


#: Output positions from which a traced batch-1 graph gathers the kept kernels (else it runs
#: the masked form): transposed (stride-1 kxk, 1x1) and plain (strided kxk, whose gathered
#: kernels need one more reordering copy) convolutions. Measured in onnxruntime
#: (``benchmarks/NOTES.md``): the gathered form is 0.80-0.86x of the dense conv on 8x8 to
#: 32x32 maps at stride 1, 1.54x on 4x4 (masked 1.30x); strided, 1.22x at 16x16 output
#: (masked 1.35x), 1.41x / 3.42x at 8x8 / 4x4 (masked 1.26x / 1.35x).
TRACED_GATHER_MIN_POSITIONS = {"transposed": 64, "plain": 256}

#: :data:`TRACED_GATHER_MIN_POSITIONS` for layers exported under :class:`nchwc_export` (their
#: gathered conv runs blocked): DyResNet-18's 256->512 stride-2 layer (8x8 output) measured
#: 0.29 ms gathered against 0.47 ms masked in onnxruntime; on 4x4 outputs the gather and
#: reorder of the kept kernels cost more than the masked conv (1.45 against 1.30 ms)
#: (``benchmarks/NOTES.md``).
NCHWC_GATHER_MIN_POSITIONS = {"transposed": 64, "plain": 64}


def traced_inference_form(x: Tensor, spec: ConvSpec, blocked: bool = False) -> str:
    """The form a traced, compiled or exported inference graph runs for ``impl="auto"``.

    A static batch of 1: ``"head_grouped"`` (a Gather of the kept kernel rows and one
    ``h``-group ConvTranspose/Conv node) where the output map has at least
    :data:`TRACED_GATHER_MIN_POSITIONS` positions or the kernel is 1x1, else ``"masked"``
    (constant weights, which onnxruntime pre-packs: faster where gathering the kept kernels
    costs more than the MACs it saves). Other batches, a dynamic one included:
    ``"masked"`` (batch-independent plain ops). ``blocked``: the layer exports for
    onnxruntime's blocked convs (:class:`nchwc_export`): :data:`NCHWC_GATHER_MIN_POSITIONS`.
    """
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    if not (isinstance(batch, int) and batch == 1):
        return "masked"
    if spec.kernel_size == (1, 1) or not (isinstance(height, int) and isinstance(width, int)):
        return "head_grouped"
    out_height, out_width = spec.output_size(height, width)
    kind = "transposed" if runs_transposed(spec) else "plain"
    limits = NCHWC_GATHER_MIN_POSITIONS if blocked else TRACED_GATHER_MIN_POSITIONS
    return "head_grouped" if out_height * out_width >= limits[kind] else "masked"


def _inactive(module: SparseDynamicGroupConv2d) -> int:
    return module.spec.in_channels - module.kept


def _run(form: str) -> Callable[[SparseDynamicGroupConv2d, Tensor, Tensor], Tensor]:
    def run(module: SparseDynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
        return run_inference_form(
            form,
            x,
            g,
            _inactive(module),
            module.weight,
            module.spec,
            module.heads,
            module.layout,
            None if tracing() else module.workspace,
            module.bias if form in ADDS_BIAS else None,
        )

    run.__name__ = f"_run_{form}"
    return run


def _run_cpu_kernel(module: SparseDynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    """``"cpu_kernel"`` as the module runs it: the form's refusal (:func:`_cpu_kernel_refuses`)
    is checked before every call (:class:`~dynaconv.layers.ChoosesForm`; a settled choice is
    one per autocast state), so the kernel is called without checking again."""
    return cpu.selected_conv_cpu_unchecked(
        x, g, module.kept, module.layout("cpu_kernel"), module.spec, module.heads, module.bias
    )


#: The cached weight layouts each form reads (:meth:`SparseDynamicGroupConv2d.layout`).
FORM_LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "head_grouped": ("rows", "tap_rows"),
    "batch_grouped": ("rows",),
    "masked": ("head_kernels",),
    "bmm": (),
    "triton": ("triton",),
    "cpu_kernel": ("cpu_kernel",),
}

#: The forms that add the layer's bias themselves (fused into their output pass).
ADDS_BIAS = frozenset({"cpu_kernel"})


def _cpu_kernel_refuses(module: SparseDynamicGroupConv2d, call: FormCall) -> str | None:
    if call.autocast:
        return "autocast asks for reduced precision; the kernel computes in the input's dtype"
    return cpu.unusable_reason(call.x, module.weight)


def _rule(module: SparseDynamicGroupConv2d, call: FormCall) -> list[str]:
    """Without measuring: the Triton kernel on CUDA; on the CPU the compiled kernel where it
    can run (it measured fastest on every stage shape of ResNet-18 at batch 1 and 16 but
    512 channels on 4x4 maps at batch 16, a tie with ``"masked"``, and on small 1x1 layers;
    ``benchmarks/NOTES.md``), then the head-grouped conv at batch 1, else ``"bmm"`` for 1x1
    stride-1 kernels and the batch-grouped conv otherwise (the masked form where that is no
    candidate: small maps); ``"bmm"`` elsewhere."""
    if triton_preferred(call.x):
        return ["triton", "bmm"]
    if call.x.device.type == "cpu":
        first = ["cpu_kernel", *(["head_grouped"] if call.x.shape[0] == 1 else [])]
        pointwise = module.spec.kernel_numel == 1 and module.spec.stride == (1, 1)
        return [*first, "bmm"] if pointwise else [*first, "batch_grouped", "masked", "bmm"]
    return ["bmm"]


def _pointwise_only(module: SparseDynamicGroupConv2d, call: FormCall) -> bool:
    """``"bmm"`` is measured for 1x1 kernels only: with larger kernels its unfold copies the
    input ``kh*kw`` times and it has never measured fastest on the CPU
    (``benchmarks/NOTES.md``)."""
    return module.spec.kernel_size == (1, 1)


#: ``"batch_grouped"`` is measured where each example's kernel copy is at most this many times
#: the example's input (values): beyond it, copying a kernel per example cost more than the
#: saved MACs in every measurement (256 channels on 8x8 maps at batch 16, a ratio of 18:
#: 2.5x of the dense conv; ``benchmarks/NOTES.md``), and a measured choice on a loaded
#: machine could still pick it.
BATCH_GROUPED_MAX_KERNEL_RATIO = 8


def _batch_grouped_candidate(module: SparseDynamicGroupConv2d, call: FormCall) -> bool:
    """Measured at batch > 1 where the per-example kernel copy is small (see
    :data:`BATCH_GROUPED_MAX_KERNEL_RATIO`). At batch 1 it is ``"head_grouped"``'s
    computation without the latter's batch-1 workspace and 1x1 matrix product."""
    x = call.x
    if x.shape[0] <= 1:
        return False
    spec = module.spec
    kernel = spec.out_channels * padded_width(spec, module.kept) * spec.kernel_numel
    return kernel <= BATCH_GROUPED_MAX_KERNEL_RATIO * x[0].numel()


#: The deployed DGC layer's execution forms (the declaration
#: :class:`~dynaconv.layers.ChoosesForm` reads). Where each is fastest on the CPU:
#: ``"cpu_kernel"`` (:mod:`dynaconv.layers.dgc.cpu`, compiled at first use; inference only)
#: on every ResNet-18 stage shape at batch 1 and 16 but 512 channels on 4x4 maps at batch 16
#: (``benchmarks/NOTES.md``); where it cannot run (no compiler, a gradient, another dtype or
#: device), the PyTorch forms:
#: ``"head_grouped"`` at batch 1 (the kept MACs plus one gather of the kept kernels, the limit);
#: ``"batch_grouped"`` on large maps at batch > 1; ``"masked"`` on small maps at batch > 1,
#: where copying a kernel per example costs more than the saved MACs, and on the smallest
#: layers at batch 1 (64 channels on 8x8 maps: no gathers); ``"bmm"`` for 1x1 kernels (with
#: larger kernels its unfold copies the input ``kh*kw`` times: see :func:`_pointwise_only`).
#: ``kept`` is fixed structure, so the gathered ``"bmm"`` and ``"masked"`` forms trace and export; a traced graph runs :func:`traced_inference_form` (``"head_grouped"`` at
#: a static batch of 1, where the set of kept channels is one per head).
FORMS = Forms(
    forms={
        "head_grouped": Form(_run("head_grouped"), batch_dependent=True, traceable=False),
        "batch_grouped": Form(
            _run("batch_grouped"),
            batch_dependent=True,
            traceable=False,
            candidate=_batch_grouped_candidate,
        ),
        "masked": Form(_run("masked")),
        "bmm": Form(_run("bmm"), candidate=_pointwise_only),
        "triton": Form(_run("triton"), triton=True, batch_dependent=True, traceable=False),
        "cpu_kernel": Form(
            _run_cpu_kernel,
            batch_dependent=True,
            traceable=False,
            refuses=_cpu_kernel_refuses,
        ),
    },
    rule=_rule,
    export=lambda module, x: traced_inference_form(
        x, module.spec, _blocked_width(x, module.spec, module.heads, module.kept) is not None
    ),
    # the map size too: which forms are candidates depends on it
    key=lambda module, x, *args: (
        module.spec,
        module.heads,
        module.kept,
        module.fc1_weight.shape,
        tuple(x.shape[2:]),
    ),
)


class SparseDynamicGroupConv2d(ChoosesForm, nn.Module):
    """The deployed DGC layer: computes only the kept channels of each example and head.

    Same numbers as :class:`DynamicGroupConv2d` in eval mode, at ``K/Cin`` of the conv MACs
    (``K = Cin - k_off``). ``impl``: ``"auto"``, ``"torch"``, ``"head_grouped"``,
    ``"batch_grouped"``, ``"masked"``, ``"bmm"``, ``"triton"`` or ``"cpu_kernel"`` (or an
    older spelling).
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
        check_choice(saliency_mode, "saliency_mode", SALIENCY_MODES)
        check_int(
            kept,
            "kept",
            1,
            f"an int in [1, in_channels={spec.in_channels}]",
            maximum=spec.in_channels,
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
        self._workspaces: dict[tuple[Any, ...], Tensor] = {}

    def layout(self, name: Layout) -> Tensor:
        """``weight`` in the layout a form reads (:func:`weight_layout`). Derived from
        ``weight`` on first use and cached (not state) while ``weight`` is the same tensor,
        unchanged in place; so loading, ``functional_call`` and in-place writes are followed.
        Traced graphs derive it in the graph (a constant there)."""
        weight = self.weight.detach()
        if tracing():
            return weight_layout(weight, self.heads, self.spec, name)
        key = (weight.data_ptr(), tensor_version(weight), weight.dtype, weight.device, weight.shape)
        cached = self._layouts.get(name)
        if cached is None or cached[0] != key:
            cached = (key, weight_layout(weight, self.heads, self.spec, name))
            self._layouts[name] = cached
        return cached[1]

    def workspace(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, the same one on every call
        of this thread (contents undefined): where the batch-1 form gathers its kernels. Not
        state; one per thread, so threads sharing the module do not share it."""
        # inference mode in the key: a tensor made under it cannot be written outside it
        key = (
            threading.get_ident(),
            torch.is_inference_mode_enabled(),
            shape,
            like.dtype,
            like.device,
        )
        spaces = self.__dict__.setdefault("_workspaces", {})
        space = spaces.get(key)
        if space is None:
            space = spaces[key] = like.new_empty(shape)
        return space

    def _drop_unused_layouts(self, form: str) -> None:
        """Once ``form`` is a settled choice (``auto``'s memo holds it), free the cached
        layouts and workspaces that no settled form reads: measuring builds one per candidate
        (DyResNet-18: 104 MiB beside 43 MiB of weights). A later choice rebuilds its own."""
        memo = self.__dict__.get("_form_memo")
        if memo is None or memo[3] != form:
            return
        settled = self.__dict__.setdefault("_settled_forms", set())
        settled.add(form)
        reads = {name for chosen in settled for name in FORM_LAYOUTS.get(chosen, ())}
        # (measuring another input shape rebuilds its candidates' layouts: checked each call)
        for name in [name for name in self._layouts if name not in reads]:
            del self._layouts[name]
        if "head_grouped" not in settled:
            self.__dict__.get("_workspaces", {}).clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_layouts"] = {}  # caches: copies and pickles derive their own
        state["_workspaces"] = {}
        state.pop("_settled_forms", None)
        return state

    @classmethod
    def from_layer(cls, layer: Any) -> SparseDynamicGroupConv2d:
        """The deployed copy of ``layer`` (a :class:`~dynaconv.layers.dgc.DynamicGroupConv2d`,
        read for its tensors and spec only: this module never imports the layer's)."""
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

    def fold_batchnorm(self, norm: nn.BatchNorm2d) -> SparseDynamicGroupConv2d:
        """This layer followed by ``norm`` (eval mode, running statistics) as one layer: the
        kernel rows of output channel ``o`` scaled by ``s_o = gamma_o / sqrt(var_o + eps)``,
        the bias ``s_o * b_o + beta_o - s_o * mean_o`` (``b`` this layer's bias or 0). Exact
        in real arithmetic: the selection reads the input only, and the convolution is
        linear per output channel. A new module; ``ValueError`` for a BatchNorm in training
        mode or without running statistics, or of another width."""
        if norm.training:
            raise ValueError("norm must be in eval mode to fold")
        if isinstance(norm, nn.BatchNorm2d) and norm.num_features != self.spec.out_channels:
            raise ValueError(
                f"norm has {norm.num_features} features, the layer "
                f"{self.spec.out_channels} output channels"
            )
        scale, shift = fold_batchnorm(norm)
        weight = self.weight.detach()
        with torch.no_grad():
            dtype = torch.promote_types(weight.dtype, torch.float32)
            scale, shift = scale.to(dtype), shift.to(dtype)
            if self.bias is not None:
                shift = shift + self.bias.to(dtype) * scale
            folded_weight = (weight.to(dtype) * scale.reshape(-1, 1, 1, 1)).to(weight.dtype)
        folded = type(self)(
            self.spec,
            self.heads,
            self.kept,
            folded_weight,
            shift.to(weight.dtype),
            self.fc1_weight,
            self.fc2_weight,
            self.fc2_bias,
            self.impl,
            self.saliency_mode,
        )
        return folded.train(self.training)

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        traced = tracing()
        if not traced:
            check_output_size(x, self.spec, type(self).__name__)
        g = saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )
        form = self.choose_form(x, g)
        out = self.forms[form].run(self, x, g)
        if not traced:
            self._drop_unused_layouts(form)
        if self.bias is not None and form not in ADDS_BIAS:
            bias = self.bias.reshape(1, -1, 1, 1)
            # the forms return a fresh tensor: add in place where autograd allows it
            out = out + bias if traced or out.requires_grad else out.add_(bias)
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
