"""The vocabulary of execution forms, and the switches every layer's choice of form reads.

Every layer with more than one exact way to compute its output takes ``impl=``. The names mean
the same in every family; each family declares the forms it has beside its layer (a
:class:`~dynaconv.layers.Forms`, see CONTRIBUTING.md), and :class:`~dynaconv.layers.DynaConv2d`
(with the deployed modules) holds the one sequence that picks a form for a call:

=================  ============================================================================
``impl``           meaning
=================  ============================================================================
``"auto"``         the fastest of the layer's forms, measured once per layer configuration,
                   input shape, dtype, device and mode (training step or inference) and
                   cached for the process; the family's rule where measuring is switched off
                   (:func:`set_measuring`, ``DYNACONV_MEASURE=0``, deterministic algorithms)
                   or impossible (an empty batch, CUDA graph capture); traced graphs run the
                   family's export form
``"torch"``        as ``"auto"``, restricted to the plain PyTorch forms (never a Triton kernel)
``"triton"``       the family's fused Triton kernel (:mod:`dynaconv.kernels`)
``"loop"``         a Python loop over the examples, one convolution each (a per-example paper form)
``"batch_grouped"``  one convolution whose groups are the examples (times the layer's groups or
                   heads); the number of groups depends on the batch, so it does not export
                   with a dynamic batch
``"bmm"``          unfold (or gather) the input into columns, then batched matrix products per
                   example; batch-independent plain ops, so it exports
``"masked"``       the paper's masked dense form: every channel computed, the gates multiplied
                   in, no MACs saved
``"head_grouped"``  one convolution per set of examples that keep the same channels, its
                   groups the heads (batch 1: one ``h``-group conv over the kept channels)
``"expert_sum"``   one convolution with all experts' kernels, then the routing-weighted sum
``"taps"``         per-example mixed kernels applied one kernel tap at a time
=================  ============================================================================

(A family with one PyTorch form calls it ``"torch"``: the policy and the form are the same
thing. Which forms a family has: its ``FORMS``, beside its layer.) Older spellings are accepted and mean the canonical
name (:data:`ALIASES`): ``"grouped"`` is ``"batch_grouped"``, ``"sparse"`` is ``"bmm"`` and
``"dense"`` is ``"masked"``. :func:`resolve_impl` validates and canonicalises (layers do it
once, when ``impl`` is set).

Also here: the single answer to "is this code being traced, compiled or exported"
(:func:`tracing`), the Triton switches (:func:`triton_available`, :func:`triton_usable`,
:func:`triton_preferred`, :func:`interpreting`), the measuring switch (:func:`set_measuring`,
:func:`measuring`, :func:`measuring_enabled`) and the cache of measured choices
(:class:`MeasuredChoices`, :data:`measured_choices`, :func:`clear_measured_choices`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "ALIASES",
    "IMPLS",
    "MEASURE_ENV",
    "MeasuredChoices",
    "choice_timer",
    "clear_measured_choices",
    "cuda_timer",
    "host_timer",
    "interpreting",
    "measure_after",
    "measured_choices",
    "measuring",
    "measuring_enabled",
    "memo_token",
    "recheck_after",
    "resolve_impl",
    "set_measuring",
    "thread_timer",
    "tracing",
    "triton_available",
    "triton_preferred",
    "triton_unusable_reason",
    "triton_usable",
]

log = logging.getLogger("dynaconv")

#: The canonical ``impl`` names, with one line each (see the module docstring).
IMPLS: dict[str, str] = {
    "auto": "the fastest form, measured once per configuration and shape (rule when off)",
    "torch": "as auto, restricted to plain PyTorch forms (never a Triton kernel)",
    "triton": "the family's fused Triton kernel",
    "loop": "a Python loop over the examples, one convolution each",
    "batch_grouped": "one convolution whose groups are the examples (x groups or heads)",
    "bmm": "unfolded or gathered input columns, batched matrix products; exportable",
    "masked": "the paper's masked dense form (every channel computed, gates multiplied in)",
    "head_grouped": "one head-grouped conv per set of examples keeping the same channels",
    "expert_sum": "one convolution with all experts' kernels, then the weighted sum",
    "taps": "per-example mixed kernels applied one kernel tap at a time",
    "cpu_kernel": "a compiled C++ CPU kernel (built at first use) reading the kept rows in place",
}

#: Older spellings, accepted wherever their canonical name is.
ALIASES: dict[str, str] = {"grouped": "batch_grouped", "sparse": "bmm", "dense": "masked"}


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
    return (
        torch.compiler.is_compiling()
        or _is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or _in_onnx_export()
    )


@functools.cache
def _exporting_check() -> Callable[[], bool]:
    # looked up once: ``getattr`` on ``torch.compiler`` costs microseconds per call
    return getattr(torch.compiler, "is_exporting", lambda: False)


def _is_exporting() -> bool:
    return _exporting_check()()


@functools.cache
def _onnx_export_flags() -> Callable[[], bool]:
    """``torch.onnx.is_in_onnx_export`` without its per-call imports (a few microseconds, on
    every layer call), reading the same flags; the public function where they moved."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # pragma: no cover - depends on the torch version
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


def _in_onnx_export() -> bool:
    return _onnx_export_flags()()


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


def triton_unusable_reason(*tensors: Tensor) -> str | None:
    """Why a Triton kernel cannot run on ``tensors`` here, or None when it can."""
    if triton_usable(*tensors):
        return None
    if not triton_available():
        return "triton is not installed"
    return "it needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"


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


def thread_timer(run: Callable[[], Any], repeat: int) -> float:
    """Milliseconds of this thread's CPU time for ``repeat`` calls of ``run``.

    With one torch thread the work runs on the calling thread (the CPU autograd engine
    included), so this is the computation's time without the time the thread waited for a
    core: other processes' load, which a wall clock counts, does not count here.
    """
    start = time.thread_time()
    for _ in range(repeat):
        run()
    return (time.thread_time() - start) * 1e3


def choice_timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """The timer a measured choice uses on ``device``: CUDA events on CUDA; on the CPU the
    thread's CPU time with one torch thread (:func:`thread_timer`), the wall clock with more
    (the work then runs on several threads)."""
    if device.type == "cuda":
        return cuda_timer
    return thread_timer if torch.get_num_threads() == 1 else host_timer


class MeasuredChoices:
    """Fastest choices measured once per key and kept: a performance cache.

    Like cuDNN's algorithm search: the first call for a key runs every candidate a few times
    and keeps the fastest; later calls look it up. Keys must hold everything the timing
    depends on (the layers build them: the layer's configuration, the input's shape, strides,
    dtype and device, the mode). It is a cache, not model state: nothing is saved with a
    model, and :meth:`clear` (or :func:`clear_measured_choices` for the shared one) forgets it.

    A choice whose runners-up measured close to it (within ``recheck_within`` of its median)
    is *provisional*: the layer measures those contenders once more after the key's next
    calls (:meth:`recheck`), when the process has settled (the first calls of a large form
    allocate fresh memory, and the allocator's state, which differs between the first calls
    and the steady state, can change which of two close forms is faster).

    ``measured`` counts the keys measured, ``rechecked`` the provisional choices measured
    again, and ``spent_ms`` the host time spent measuring (what measuring added to a run: the
    demo reports it).
    """

    def __init__(self) -> None:
        self._choices: dict[Hashable, Any] = {}
        self._seen: dict[Hashable, int] = {}
        self._contenders: dict[Hashable, list[Any]] = {}
        self.measured = 0
        self.rechecked = 0
        self.spent_ms = 0.0

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
        self._seen.clear()
        self._contenders.clear()
        _invalidate_memos()

    def provisional(self, key: Hashable) -> bool:
        """Whether the choice for ``key`` waits for its :meth:`recheck`."""
        return key in self._contenders

    def recheck(
        self,
        key: Hashable,
        run: Callable[[Any], Any],
        *,
        timer: Callable[[Callable[[], Any], int], float] = host_timer,
        label: str = "",
    ) -> Any:
        """The choice for ``key`` after its contenders are measured once more (two warm-up
        calls each, then as :meth:`choose`), now final; a final choice is returned as it is."""
        contenders = self._contenders.pop(key, None)
        if contenders is None:
            return self._choices.get(key)
        del self._choices[key]
        chosen = self.choose(key, contenders, run, timer=timer, warmup=2, label=label)
        if key not in self._choices:  # every contender failed this time: the first choice stays
            self._choices[key] = contenders[0]
            return contenders[0]
        self.measured -= 1  # counted as a recheck, not as another key
        self.rechecked += 1
        log.debug("%s: rechecked %s -> %s", label or "measure", key, chosen)
        return chosen

    def seen(self, key: Hashable) -> int:
        """How many times ``key`` was asked for before this call (counts this call)."""
        count = self._seen.get(key, 0)
        self._seen[key] = count + 1
        return count

    def choose(
        self,
        key: Hashable,
        candidates: Sequence[C],
        run: Callable[[C], Any],
        *,
        timer: Callable[[Callable[[], Any], int], float] = host_timer,
        warmup: int = 1,
        min_rounds: int = 3,
        max_rounds: int = 12,
        budget_ms: float = 25.0,
        sample_ms: float = 1.0,
        max_inner: int = 32,
        prune: float = 2.0,
        tie: float = 0.15,
        tie_rounds: int = 8,
        recheck_within: float | None = None,
        label: str = "",
        fallback: Any = None,
    ) -> C:
        """The cached choice for ``key``, or the fastest of ``candidates`` measured now.

        1. *Screen.* Each candidate runs ``warmup`` times (allocation, library set-up,
           compilation), then once timed. One over ``2 * prune`` times the fastest so far (also
           on its warm-up call) is dropped at once (a form far off costs ``warmup + 1`` calls:
           put the likeliest candidate first), then those over ``prune`` times the fastest.
        2. *Rounds.* The rest are sampled round robin, the order rotated every round (so that
           load from other processes, and whatever one form leaves in the caches, falls on all
           alike). A sample times back-to-back calls lasting about ``sample_ms`` (at most
           ``max_inner`` calls; one call for forms longer than that), so sub-millisecond forms
           are not timed at the clock's and the scheduler's grain. Rounds go on until every
           survivor has run ``budget_ms`` in all and ``min_rounds`` rounds are done (at most
           ``max_rounds``), dropping after each round the forms whose median is over
           ``prune`` times the lowest.
        3. *Near ties.* When the two lowest medians are within ``tie`` (15%), those two are
           sampled again, alternately, for up to ``tie_rounds`` more rounds (at least two,
           until each has run another ``budget_ms``), and the one faster in the median of
           their per-round ratios (all rounds; the ratio cancels load that drifts between
           rounds) is chosen. Otherwise the lowest median.

        Cost per key, bounded: every candidate ``warmup + 1`` calls, each survivor of the
        screen about ``max(budget_ms, min_rounds * its time)`` (at most ``max_rounds``
        samples), a near tie up to ``max(budget_ms, 2 * their time)`` more for each of the two
        (at most ``tie_rounds`` samples). A candidate that raises is skipped (logged). Nothing
        is measured or cached while a CUDA graph is being captured, nor when every candidate
        fails: then ``fallback`` (default: the first candidate) is returned.

        4. *Provisional.* With ``recheck_within`` (e.g. 1.5), the survivors whose median is
           within that factor of the chosen one's are kept as contenders: the choice is
           provisional until :meth:`recheck` measures them again.
        """
        if key in self._choices:
            return self._choices[key]
        if fallback is None:
            fallback = candidates[0]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return fallback
        started = time.perf_counter()
        first = _screen(candidates, run, timer, warmup, prune, label)
        if not first:
            return fallback
        lead = min(first.values())
        survivors = [i for i in first if first[i] <= prune * lead]
        inner = {
            i: max(1, min(max_inner, math.ceil(sample_ms / max(first[i], 1e-6)))) for i in first
        }
        samples: dict[int, list[float]] = {i: [] for i in survivors}

        def sample(index: int) -> float:
            elapsed = timer(lambda: run(candidates[index]), inner[index]) / inner[index]
            samples[index].append(elapsed)
            return elapsed * inner[index]

        spent = dict.fromkeys(survivors, 0.0)
        rounds = 0
        while len(survivors) > 1 and rounds < max_rounds:
            if rounds >= min_rounds and min(spent.values()) >= budget_ms:
                break
            shift = rounds % len(survivors)
            for index in survivors[shift:] + survivors[:shift]:
                spent[index] += sample(index)
            rounds += 1
            medians = {i: statistics.median(samples[i]) for i in survivors}
            low = min(medians.values())
            survivors = [i for i in survivors if medians[i] <= prune * low]
            spent = {i: spent[i] for i in survivors}
        ranked = sorted(survivors, key=lambda i: statistics.median(samples[i]) if samples[i] else 0)
        best = ranked[0]
        if len(ranked) > 1:
            a, b = ranked[:2]
            if statistics.median(samples[b]) <= (1 + tie) * statistics.median(samples[a]):
                more = {a: 0.0, b: 0.0}
                for extra in range(tie_rounds):
                    if extra >= 2 and min(more.values()) >= budget_ms:
                        break
                    for index in (a, b) if extra % 2 else (b, a):
                        more[index] += sample(index)
                ratios = [ta / tb for ta, tb in zip(samples[a], samples[b], strict=True)]
                best = a if statistics.median(ratios) <= 1.0 else b
                log.debug(
                    "%s: near tie %s / %s, ratio %.3f", label, a, b, statistics.median(ratios)
                )
        chosen = candidates[best]
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.measured += 1
        self.spent_ms += elapsed_ms
        log.debug("%s: measured %s -> %s in %.1f ms", label or "measure", key, chosen, elapsed_ms)
        self._choices[key] = chosen
        self._seen[key] = 0  # a provisional choice's recheck counts the calls from here
        if recheck_within is not None and samples[best]:
            lead = statistics.median(samples[best])
            close = [
                candidates[i]
                for i in ranked
                if i != best
                and samples[i]
                and statistics.median(samples[i]) <= recheck_within * lead
            ]
            if close:
                self._contenders[key] = [chosen, *close]
        return chosen


def _screen(
    candidates: Sequence[C],
    run: Callable[[C], Any],
    timer: Callable[[Callable[[], Any], int], float],
    warmup: int,
    prune: float,
    label: str,
) -> dict[int, float]:
    """Milliseconds of one timed call per candidate after ``warmup`` calls (step 1 of
    :meth:`MeasuredChoices.choose`): those far off, and those that raise, left out."""
    first: dict[int, float] = {}
    for index, candidate in enumerate(candidates):
        try:
            loose = math.inf
            for _ in range(warmup):
                loose = timer(lambda c=candidate: run(c), 1)
            timed = timer(lambda c=candidate: run(c), 1)
        except Exception as error:  # a candidate that cannot run here is not chosen
            log.warning("%s: candidate %s failed: %s", label or "measure", candidate, error)
            continue
        if first and min(loose, timed) > 2 * prune * min(first.values()):
            continue  # far off, also after its first call's set-up: not sampled again
        first[index] = timed
    return first


#: The shared cache of measured choices of the layers' ``impl="auto"`` (per process).
measured_choices = MeasuredChoices()


def clear_measured_choices() -> None:
    """Forget every measured choice (they are measured again on the next call)."""
    measured_choices.clear()


#: What a layer's memo of its last choice (:meth:`dynaconv.layers.ChoosesForm.choose_form`)
#: is valid for: replaced whenever a choice may change (the shared cache cleared, measuring
#: switched), which invalidates every memo at once. An object, not a counter, so that a memo
#: pickled or deep-copied with a module is never valid in another process or copy.
_memo = {"token": object()}


def _invalidate_memos() -> None:
    _memo["token"] = object()


def memo_token() -> object:
    """The current token of the layers' memos of their last choice (see ``_memo``)."""
    return _memo["token"]


#: The environment variable that switches measuring off (``0``) for the process.
MEASURE_ENV = "DYNACONV_MEASURE"

#: Whether ``impl="auto"`` measures, and after how many calls of a key it does.
_settings = {
    "enabled": os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off"),
    "after": 2,
    "recheck": 8,
}


def _check_settings(enabled: Any, after: Any, recheck: Any) -> None:
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    for name, value in (("after", after), ("recheck", recheck)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")


def set_measuring(enabled: bool, *, after: int | None = None, recheck: int | None = None) -> None:
    """Switch measured choices of ``impl="auto"`` on or off for the process.

    On (the default), a call whose key (layer configuration, input shape, dtype, device,
    mode) has been seen ``after`` times before (default 2) measures the candidates and
    keeps the fastest; earlier calls of the key run the family's rule, so that a shape met
    once or twice (a last partial batch, a one-off evaluation) never pays for measuring.
    Where other forms measured within 1.5x of the chosen one, the choice is provisional
    and, after the key's next ``recheck`` calls (default 8; ``0``: never), those forms
    are measured once more, in the settled process, and that choice is final
    (:meth:`MeasuredChoices.recheck`). Off, every ``"auto"`` layer runs its family's
    rule: a fixed function of the layer's configuration, the input and the device, so
    runs are reproducible form for form (what benchmarks that compare runs want). Also off
    while the environment variable ``DYNACONV_MEASURE=0`` was set at import, and while
    ``torch.use_deterministic_algorithms(True)`` is on.
    """
    _check_settings(enabled, after, recheck)
    _settings["enabled"] = enabled
    if after is not None:
        _settings["after"] = after
    if recheck is not None:
        _settings["recheck"] = recheck
    _invalidate_memos()


@contextlib.contextmanager
def measuring(
    enabled: bool, *, after: int | None = None, recheck: int | None = None
) -> Iterator[None]:
    """A context in which measuring is on or off (:func:`set_measuring`), restored after."""
    _check_settings(enabled, after, recheck)
    before = dict(_settings)
    set_measuring(enabled, after=after, recheck=recheck)
    try:
        yield
    finally:
        _settings.update(before)
        _invalidate_memos()


def measuring_enabled() -> bool:
    """Whether ``impl="auto"`` measures its candidates (else it runs the family's rule):
    on unless switched off (:func:`set_measuring`, ``DYNACONV_MEASURE=0``) or
    ``torch.use_deterministic_algorithms(True)`` is on."""
    return _settings["enabled"] and not torch._C._get_deterministic_algorithms()


def recheck_after() -> int:
    """How many calls of a key follow a provisional choice before its contenders are
    measured again (:func:`set_measuring`; ``0``: provisional choices are final)."""
    return _settings["recheck"]


def measure_after() -> int:
    """How many calls of a key run the rule before the next one measures (:func:`set_measuring`)."""
    return _settings["after"]
