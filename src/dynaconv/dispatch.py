"""The one place that picks how a layer computes: the ``impl`` vocabulary and its rules.

Every layer with more than one exact way to compute its output takes ``impl=``. The names mean
the same in every family (a family accepts the subset it has, :data:`FAMILY_IMPLS`):

=================  ============================================================================
``impl``           meaning
=================  ============================================================================
``"auto"``         chosen per call by this module's rule for the family (shape, device, dtype,
                   gradient, tracing); on CUDA with ``torch.backends.cudnn.benchmark`` on,
                   measured once per configuration where a family has candidates to measure
``"torch"``        as ``"auto"``, restricted to the plain PyTorch forms (never a Triton kernel)
``"triton"``       the family's fused Triton kernel (:mod:`dynaconv.kernels`)
``"loop"``         a Python loop over the examples, one convolution each (CondConv's paper code)
``"batch_grouped"``  one convolution whose groups are the examples (times the layer's groups or
                   heads); the number of groups depends on the batch, so it does not export
                   with a dynamic batch (CondConv, DGC)
``"bmm"``          unfold (or gather) the input into columns, then batched matrix products per
                   example; batch-independent plain ops, so it exports (CondConv, DGC)
``"masked"``       the paper's masked dense form: every channel computed, the gates multiplied
                   in, no MACs saved (DGC)
``"head_grouped"``  one convolution per set of examples that keep the same channels, its
                   groups the heads (batch 1: one ``h``-group conv over the kept channels;
                   DGC)
``"expert_sum"``   one convolution with all experts' kernels, then the routing-weighted sum
                   (CondConv)
``"taps"``         per-example mixed kernels applied one kernel tap at a time (CondConv)
=================  ============================================================================

Older spellings are accepted and mean the canonical name (:data:`ALIASES`): ``"grouped"`` is
``"batch_grouped"``, ``"sparse"`` is ``"bmm"`` (DGC) and ``"dense"`` is ``"masked"`` (DGC).
:func:`resolve_impl` validates and canonicalises; layers store the canonical name.

Also here: the single answer to "is this code being traced, compiled or exported"
(:func:`tracing`), the Triton switches (:func:`triton_available`, :func:`triton_usable`,
:func:`triton_preferred`, :func:`interpreting`) and the cache of measured choices
(:class:`MeasuredChoices`, :func:`clear_measured_choices`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "ALIASES",
    "FAMILY_IMPLS",
    "IMPLS",
    "MeasuredChoices",
    "clear_measured_choices",
    "condconv_export_form",
    "condconv_form",
    "cuda_timer",
    "dgc_form",
    "host_timer",
    "interpreting",
    "measured_choices",
    "measuring",
    "resolve_impl",
    "tracing",
    "triton_available",
    "triton_preferred",
    "triton_usable",
    "uses_triton",
]

log = logging.getLogger("dynaconv")

#: The canonical ``impl`` names, with one line each (see the module docstring).
IMPLS: dict[str, str] = {
    "auto": "chosen per call by dynaconv.dispatch (measured on CUDA with cudnn.benchmark)",
    "torch": "as auto, restricted to plain PyTorch forms (never a Triton kernel)",
    "triton": "the family's fused Triton kernel",
    "loop": "a Python loop over the examples, one convolution each",
    "batch_grouped": "one convolution whose groups are the examples (x groups or heads)",
    "bmm": "unfolded or gathered input columns, batched matrix products; exportable",
    "masked": "the paper's masked dense form (every channel computed, gates multiplied in)",
    "head_grouped": "one head-grouped conv per set of examples keeping the same channels",
    "expert_sum": "one convolution with all experts' kernels, then the weighted sum",
    "taps": "per-example mixed kernels applied one kernel tap at a time",
}

#: Older spellings, accepted wherever their canonical name is.
ALIASES: dict[str, str] = {"grouped": "batch_grouped", "sparse": "bmm", "dense": "masked"}

#: The canonical names each family accepts.
FAMILY_IMPLS: dict[str, tuple[str, ...]] = {
    "condconv": ("auto", "torch", "loop", "batch_grouped", "expert_sum", "bmm", "taps", "triton"),
    "dgc": ("auto", "torch", "masked", "bmm", "batch_grouped", "head_grouped", "triton"),
    "dgc_deployed": ("auto", "torch", "masked", "bmm", "batch_grouped", "head_grouped", "triton"),
    "dgconv": ("auto", "torch", "triton"),
    "lgc_deployed": ("auto", "torch", "triton"),
}


def resolve_impl(impl: Any, valid: Sequence[str], argument: str = "impl") -> str:
    """The canonical name of ``impl`` if it is one of ``valid`` (or an alias of one).

    ``ValueError`` naming ``argument`` and listing the valid values otherwise.
    """
    name = ALIASES.get(impl, impl) if isinstance(impl, str) else impl
    if not isinstance(name, str) or name not in valid:
        aliases = [f"{old!r} (= {new!r})" for old, new in ALIASES.items() if new in valid]
        also = f"; also accepted: {', '.join(aliases)}" if aliases else ""
        raise ValueError(
            f"{argument} must be one of {', '.join(repr(v) for v in valid)}{also}; got {impl!r}"
        )
    return name


# --------------------------------------------------------------------------------------------
# tracing


def tracing() -> bool:
    """Whether the code runs inside a graph capture rather than eagerly.

    True under ``torch.compile`` (Dynamo), ``torch.export``, the TorchScript tracer or
    compiler and the ONNX exporter. Layers then run batch-independent plain-PyTorch forms,
    read no host value of a tensor and keep no Python-side caches.
    """
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return (
        torch.compiler.is_compiling()
        or (is_exporting is not None and is_exporting())
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


# --------------------------------------------------------------------------------------------
# Triton


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors here (CUDA, or the interpreter on CPU)."""
    if not triton_available():
        return False
    if interpreting():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def triton_preferred(*tensors: Tensor) -> bool:
    """Whether an automatic choice may run a Triton kernel on these tensors: CUDA only.

    The interpreter runs kernels on CPU tensors for tests that ask for a Triton path
    explicitly; it is far slower than PyTorch, so automatic choices never pick it.
    """
    return bool(tensors) and all(t.is_cuda for t in tensors) and triton_usable(*tensors)


def uses_triton(
    impl: str,
    *tensors: Tensor,
    supported: bool = True,
    automatic: bool = True,
    traceable: bool = False,
    what: str = "",
) -> bool:
    """The rule of the families whose only choice is Triton or PyTorch (DGConv, LGC deployed).

    ``impl`` canonical. ``"torch"``: no. Traced graphs: no, unless the kernel is
    ``traceable`` (a registered custom op). ``"triton"``: yes, or ``RuntimeError`` when the
    kernel cannot run here (not ``supported``, or no usable device; ``what`` names the
    family's own condition). ``"auto"``: when the kernel is supported, ``automatic`` (the
    family's extra conditions for choosing it by itself) and :func:`triton_preferred`.
    """
    if impl == "torch" or (tracing() and not traceable):
        return False
    if impl == "triton":
        if not (supported and triton_usable(*tensors)):
            raise RuntimeError(
                f"impl='triton' needs triton, a CUDA tensor (or TRITON_INTERPRET=1 on CPU){what}"
            )
        return True
    return supported and automatic and triton_preferred(*tensors)


# --------------------------------------------------------------------------------------------
# measured choices

C = TypeVar("C")


def cuda_timer(run: Callable[[], Any], repeat: int) -> float:
    """Milliseconds for ``repeat`` calls of ``run``, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def host_timer(run: Callable[[], Any], repeat: int) -> float:
    """Milliseconds for ``repeat`` calls of ``run`` by the host clock (CPU work)."""
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - start) * 1e3


class MeasuredChoices:
    """Fastest choices measured once per configuration and kept: a performance cache.

    Like cuDNN's algorithm search (and switched on by the same flag,
    ``torch.backends.cudnn.benchmark``, see :func:`measuring`): the first call for a key runs
    every candidate a few times and keeps the fastest; later calls look it up. Keys must
    hold everything the timing depends on: the layer's configuration, the input's shape,
    device, dtype and layout. It is a cache, not model state: nothing is saved with a model,
    and :meth:`clear` (or :func:`clear_measured_choices` for the shared one) forgets it.
    """

    def __init__(self) -> None:
        self._choices: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._choices)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._choices

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._choices))

    def get(self, key: Hashable) -> Any:
        return self._choices.get(key)

    def clear(self) -> None:
        self._choices.clear()

    def choose(
        self,
        key: Hashable,
        candidates: Sequence[C],
        run: Callable[[C], Any],
        *,
        timer: Callable[[Callable[[], Any], int], float] = cuda_timer,
        warmup: int = 2,
        repeat: int = 5,
        label: str = "",
        fallback: Any = None,
    ) -> C:
        """The cached choice for ``key``, or the fastest of ``candidates`` measured now.

        Each candidate runs ``warmup`` times (compilation, autotuning), then ``repeat`` times
        under ``timer``. A candidate that raises is skipped (logged). Nothing is measured or
        cached while a CUDA graph is being captured, nor when every candidate fails: then
        ``fallback`` (default: the first candidate) is returned.
        """
        if key in self._choices:
            return self._choices[key]
        if fallback is None:
            fallback = candidates[0]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return fallback
        timings = []
        for candidate in candidates:
            try:
                for _ in range(warmup):
                    run(candidate)
                timings.append(timer(lambda c=candidate: run(c), repeat))
            except Exception as error:  # a candidate that cannot run here is not chosen
                log.warning("%s: candidate %s failed: %s", label or "measure", candidate, error)
                timings.append(math.inf)
        best = min(range(len(candidates)), key=timings.__getitem__)
        if math.isinf(timings[best]):
            return fallback
        self._choices[key] = candidates[best]
        return candidates[best]


#: The shared cache of measured choices of the layers' ``impl="auto"`` (per process).
measured_choices = MeasuredChoices()


def clear_measured_choices() -> None:
    """Forget every measured choice (they are measured again on the next call)."""
    measured_choices.clear()


def measuring(*tensors: Tensor) -> bool:
    """Whether ``impl="auto"`` should measure its candidates for a call on ``tensors``.

    On CUDA with ``torch.backends.cudnn.benchmark`` on (the switch of cuDNN's own search),
    in eager mode. (During CUDA graph capture :meth:`MeasuredChoices.choose` only looks up.)
    """
    return (
        torch.backends.cudnn.benchmark
        and bool(tensors)
        and all(t.is_cuda for t in tensors)
        and not tracing()
    )


# --------------------------------------------------------------------------------------------
# CondConv

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def condconv_export_form(spec: Any, weight: Tensor | None = None) -> str:
    """The form a traced, compiled or exported CondConv runs: ``"bmm"`` for 1x1 kernels,
    ``"expert_sum"`` for depthwise kxk (``Cin/groups == 1``), ``"taps"`` for other kxk."""
    if spec.kernel_size == (1, 1):
        return "bmm"
    return "expert_sum" if spec.in_channels // spec.groups == 1 else "taps"


def condconv_form(
    spec: Any,
    device: torch.device,
    dtype: torch.dtype,
    needs_grad: bool,
    allow_triton: bool = True,
) -> str:
    """The form CondConv's ``impl="auto"`` runs (``"torch"``: with ``allow_triton=False``).

    * Traced, compiled or exported: :func:`condconv_export_form` (plain batch-independent
      ops: a dynamic batch exports; the batch-folded forms do not). For depthwise kxk every
      exact form is a chain of ``kh * kw`` memory-bound passes, which measured 1.3-2.5x
      slower in onnxruntime than one depthwise conv to ``E * C`` channels
      (``benchmarks/NOTES.md``), hence ``"expert_sum"`` there.
    * Depthwise (``groups == Cin``): ``"batch_grouped"``: the folded conv is depthwise too.
    * On CUDA with Triton, floating inputs, ``Cin/groups >= 16`` and no gradient needed:
      ``"triton"`` (measured against the PyTorch forms when ``cudnn.benchmark`` is on).
    * CPU inference with kxk kernels: ``"loop"``: oneDNN runs the per-example convs about as
      efficiently as one batched conv, 1.1-1.3x faster than the folded grouped conv
      (``benchmarks/RESULTS.md``); its host overhead is negligible next to CPU conv times.
    * Otherwise: ``"bmm"`` for 1x1 kernels, ``"batch_grouped"`` for kxk (cuDNN and oneDNN run
      grouped convs well; unfold + bmm costs memory).

    The same rule serves every call and :meth:`CondConv2d.inference_form` (what ``deploy()``
    fixes), so a deployed layer runs what the layer ran in eval mode.
    """
    device = torch.device(device)
    if tracing():
        return condconv_export_form(spec)
    if spec.groups == spec.in_channels and spec.groups > 1:
        return "batch_grouped"
    if (
        allow_triton
        and device.type == "cuda"
        and not needs_grad
        and spec.in_channels // spec.groups >= 16
        and dtype in _FLOATS
        and triton_available()
        and not interpreting()
    ):
        return "triton"
    if spec.kernel_size == (1, 1):
        return "bmm"
    return "loop" if device.type == "cpu" and not needs_grad else "batch_grouped"


#: CondConv forms that cannot run on an empty batch (a Python loop, ``B * groups`` conv
#: groups, a kernel grid over ``B``) or in a traced graph with a dynamic batch.
CONDCONV_BATCH_DEPENDENT = ("loop", "batch_grouped", "triton")


# --------------------------------------------------------------------------------------------
# DGC


def dgc_form(
    impl: str,
    needs_grad: bool,
    training: bool,
    spec: Any,
    zero_padding: bool,
    *tensors: Tensor,
) -> str:
    """The form a DGC layer runs in eager mode by rule (traced graphs always run ``"masked"``).

    Inference calls of ``"auto"``/``"torch"`` on the CPU (on CUDA with ``cudnn.benchmark``)
    do not use this rule: they measure their forms
    (:func:`dynaconv.layers.dgc_deployed.choose_inference_form`).

    ``impl`` canonical; ``zero_padding``: whether the layer's padding is symmetric zeros (the
    Triton training path needs it). An empty batch runs ``"bmm"`` (unless ``"masked"`` is
    asked for). ``"triton"`` raises ``ValueError`` where it cannot run. ``"auto"``: on CUDA
    with Triton ``"triton"`` (training with zero padding, and inference; evaluation with a
    gradient ``"bmm"``); on CPU ``"bmm"`` for 1x1 stride-1 kernels and ``"batch_grouped"``
    otherwise (the fastest measured, ``benchmarks/RESULTS.md``, training too); elsewhere
    ``"masked"`` for training and ``"bmm"`` for inference. ``"torch"``: the same without Triton.
    """
    compiling = tracing()
    if impl != "masked" and not compiling and tensors[0].shape[0] == 0:
        return "bmm"  # an empty batch: no groups to form, no kernel grid to launch
    if impl == "triton":
        if not triton_usable(*tensors):
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"
            )
        if needs_grad and not zero_padding:
            raise ValueError(
                "impl='triton' trains only with zero padding (padding_mode='zeros', symmetric); "
                "use 'bmm' or 'masked'"
            )
        return impl
    if impl not in ("auto", "torch"):
        return impl
    if impl == "auto" and not compiling and triton_preferred(*tensors):
        if not needs_grad:
            return "triton"
        if not training:
            return "bmm"
        return "triton" if zero_padding else "masked"
    # The batch-grouped form specialises on the batch and k_off: not in traced graphs.
    if all(t.device.type == "cpu" for t in tensors) and not compiling:
        return "bmm" if spec.kernel_numel == 1 and spec.stride == (1, 1) else "batch_grouped"
    if needs_grad and training:
        return "masked"
    return "bmm"
