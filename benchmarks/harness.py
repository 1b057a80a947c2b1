"""Shared timing harness for the layer and network benchmarks.

Latency: CUDA events on GPU (``time.perf_counter`` elsewhere), after warm-up, median of
repeated samples of back-to-back calls (see :func:`measure`). Peak memory: ``torch.cuda.max_memory_allocated`` above the
baseline on GPU (not measured on CPU). Every case is reported as a ratio to the plain PyTorch
equivalent measured in the same run, with device, dtype and torch version in the header.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynaconv.dispatch import cuda_timer, host_timer


@dataclass
class Timing:
    median_ms: float
    peak_mib: float | None = None


@dataclass
class Row:
    case: str
    variant: str
    metric: str
    ms: float
    baseline_ms: float
    peak_mib: float | None = None
    baseline_peak_mib: float | None = None
    bar: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ms / self.baseline_ms

    @property
    def memory_ratio(self) -> float | None:
        if self.peak_mib is None or not self.baseline_peak_mib:
            return None
        return self.peak_mib / self.baseline_peak_mib

    @property
    def verdict(self) -> str:
        if self.bar is None:
            return ""
        return "ok" if self.ratio <= self.bar else "MISS"


def environment(device: torch.device) -> str:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    threads = torch.get_num_threads()
    return f"device={device.type} ({name}), torch {torch.__version__}, threads={threads}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate_inner(fn: Callable[[], object], device: torch.device, target_ms: float) -> int:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    single_ms = (time.perf_counter() - t0) * 1e3
    return max(1, min(100, int(target_ms / max(single_ms, 1e-3))))


def _sample(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Milliseconds per call over ``inner`` back-to-back calls."""
    # Not torch.utils.benchmark.Timer: its autoranges (blocked_autorange, adaptive_autorange)
    # take all samples of one statement back to back, which breaks the round robin over the
    # variants (see measure_interleaved); sample by sample (Timer.timeit) it runs a warm-up of
    # at least two calls before each sample and sets its own thread count (one by default),
    # which triples a slow network's run at inner=1 and hides a thread setting. On CUDA it
    # times by the host clock after a synchronize, where events time the device's queue.
    timer = cuda_timer if device.type == "cuda" else host_timer
    return timer(fn, inner) / inner


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 10,
    reps: int = 50,
    target_ms: float = 2.0,
) -> dict[str, float]:
    """Median latency of each of ``fns``, their samples taken in turn (round robin).

    On a shared or throttling machine the speed drifts during a run; measuring variants one
    after another lets the drift land on one of them (identical modules have read 1.4x apart
    on the shared CPU). Interleaving gives every variant the same conditions, so their
    ratios are fair even where absolute times move.
    """
    inners = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        inners[name] = _calibrate_inner(fn, device, target_ms)
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_sample(fn, device, inners[name]))
    return {name: statistics.median(samples) for name, samples in times.items()}


def measure(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 10,
    reps: int = 50,
    memory: bool = False,
    target_ms: float = 2.0,
) -> Timing:
    """Median latency of one call of ``fn`` in milliseconds (and its peak extra memory on CUDA).

    Each of the ``reps`` samples times ``inner`` back-to-back calls (chosen so that a sample
    lasts about ``target_ms``) between two CUDA events and divides by ``inner``: the host
    queues work ahead, as it does inside a network, so the figure is the device time unless
    the host cannot keep up (then it is the host time, also honestly reported).
    """
    median_ms = measure_interleaved({"fn": fn}, device, warmup, reps, target_ms)["fn"]
    peak = None
    if memory and device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return Timing(median_ms, peak)


def device_ms(fn: Callable[[], object], device: torch.device, calls: int = 10) -> float | None:
    """Device time of one call: the sum of its GPU kernels' durations (torch.profiler).

    A single small layer's eager training step is often bound by the host (Python and
    dispatch), not the GPU; this figure says what the step costs the GPU, which is what it adds
    inside a network whose host work overlaps the device's. ``None`` off CUDA.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e3 / calls


def forward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def train_step_fn(
    module: nn.Module, x: torch.Tensor, extra_loss: Callable[[], torch.Tensor] | None = None
) -> Callable[[], object]:
    """Forward, a loss, backward (parameter and input gradients), zeroing grads."""
    x = x.detach().requires_grad_(True)

    def run() -> object:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        loss = out.float().square().mean()
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        return loss

    return run


def common_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per case)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few reps (smoke test)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    on_gpu = args.device.type == "cuda"
    args.reps = args.reps or (3 if args.quick else (50 if on_gpu else 10))
    args.warmup = args.warmup or (1 if args.quick else (10 if on_gpu else 2))
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    return args


def report(
    title: str, rows: list[Row], device: torch.device, dtype: torch.dtype, path: Path | None = None
) -> str:
    lines = [
        f"## {title}",
        f"{environment(device)}, dtype={str(dtype).replace('torch.', '')}",
        "",
        "| case | variant | metric | ms | baseline ms | ratio | bar | peak MiB ratio | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = f"{r.memory_ratio:.2f}x" if r.memory_ratio is not None else ""
        bar = f"<= {r.bar:.2f}x {r.verdict}" if r.bar is not None else ""
        lines.append(
            f"| {r.case} | {r.variant} | {r.metric} | {r.ms:.3f} | {r.baseline_ms:.3f} | "
            f"{r.ratio:.2f}x | {bar} | {mem} | {r.notes} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    if path is not None:
        payload = {
            "title": title,
            "environment": environment(device),
            "dtype": str(dtype),
            "rows": [asdict(r) | {"ratio": r.ratio, "memory_ratio": r.memory_ratio} for r in rows],
        }
        path.write_text(json.dumps(payload, indent=2))
    return text
