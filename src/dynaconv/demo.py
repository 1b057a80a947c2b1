"""``python -m dynaconv demo``: every method on scikit-learn's digits, end to end.

Trains :class:`dynaconv.models.DigitsCNN` on the 8x8 digits bundled with scikit-learn (offline)
with plain convolutions, then, for each method of :data:`DEMO_METHODS`, converts the same
network with :func:`dynaconv.convert`, trains it for the same steps (calling
:func:`dynaconv.set_progress` every iteration and adding the method's weighted
:func:`dynaconv.aux_loss`), evaluates, deploys with verification, evaluates again, profiles
and times CPU inference before and after deployment. It prints one table; the exit status is
non-zero when a deployment fails verification, changes a prediction, or a method fails.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lifecycle import (
    DeployVerificationError,
    aux_loss,
    convert,
    deploy,
    dynaconv_layers,
    layer_class,
    set_progress,
)
from .models.digits import DigitsCNN
from .profile import profile

__all__ = ["AUX_LOSS_WEIGHTS", "DEMO_METHODS", "DemoResult", "main", "run_demo"]

#: Method -> options passed to :func:`dynaconv.convert`.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "doconv": {},
    "condconv": {"num_experts": 4},
    "dgc": {"heads": 4, "gate_factor": 0.25, "squeeze_rate": 4},
    "dgconv": {},
    "lgc": {"learned_groups": 4, "condense_factor": 4},
}

#: Method -> weight of ``dynaconv.aux_loss(model)`` in the training loss (docs/methods.md: DGC's
#: lasso 1e-5; CondenseNet's group lasso is off in its CIFAR recipe; none for the others).
AUX_LOSS_WEIGHTS: dict[str, float] = {"dgc": 1e-5, "lgc": 0.0}

PLAIN = "plain"
UNAVAILABLE = "not available yet"
DEFAULT_STEPS = 200


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` float tensors, standardised on the train split."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class DemoResult:
    """One row of the demo's table."""

    method: str
    status: str = "ok"
    accuracy: float | None = None
    accuracy_deployed: float | None = None
    changed_predictions: int = 0
    params: int | None = None
    params_deployed: int | None = None
    macs: int | None = None
    macs_active: int | None = None
    latency_ms: float | None = None
    latency_deployed_ms: float | None = None
    structure: str = ""
    converted: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", UNAVAILABLE)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """The fixed, stratified train/test split of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    x_train = torch.tensor(x_train, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x_test = torch.tensor(x_test, dtype=torch.float32).reshape(-1, 1, 8, 8)
    mean, std = x_train.mean(), x_train.std()
    return Digits(
        (x_train - mean) / std,
        torch.tensor(y_train, dtype=torch.long),
        (x_test - mean) / std,
        torch.tensor(y_test, dtype=torch.long),
    )


def _progress_bar(steps: int, label: str) -> Iterable[int]:
    """``range(steps)``, with a tqdm bar when stderr is a terminal and tqdm is installed."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            return range(steps)
        return tqdm(range(steps), desc=f"{label:>9s}", leave=False, file=sys.stderr)
    return range(steps)


def train(
    model: nn.Module,
    data: Digits,
    steps: int,
    aux_weight: float | None,
    *,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
    label: str = "",
) -> None:
    """SGD (Nesterov, cosine learning rate) with the schedule driven by ``set_progress``."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=generator)
    cursor = 0
    model.train()
    for step in _progress_bar(steps, label):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data.y_train), generator=generator), 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        set_progress(model, step / steps)
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        if aux_weight:
            loss = loss + aux_weight * aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    set_progress(model, 1.0)
    model.eval()


def predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(x).argmax(dim=1)


def paired_latency_ms(
    first: nn.Module, second: nn.Module, x: Tensor, reps: int, warmup: int = 2
) -> tuple[float, float]:
    """Median eval-mode latencies of one forward of ``x`` through each model.

    The two models run alternately, so that load from other processes affects both alike.
    """
    models = (first.eval(), second.eval())
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for index in range(warmup + reps):
            for model, record in zip(models, times):
                start = time.perf_counter()
                model(x)
                if index >= warmup:
                    record.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def summarise_structure(model: nn.Module) -> str:
    """The layers' distinct ``structure()`` strings, counted: ``"D_mul=9 x3; D_mul=1 x3"``."""
    counts = Counter(layer.structure() for _, layer in dynaconv_layers(model))
    return "; ".join(f"{text} x{n}" if n > 1 else text for text, n in counts.items() if text)


def run_method(
    method: str,
    data: Digits,
    steps: int,
    *,
    latency_batch: int = 256,
    latency_reps: int = 7,
    seed: int = 0,
) -> DemoResult:
    """Build, convert, train, evaluate, deploy (verified), profile and time one method."""
    result = DemoResult(method)
    started = time.perf_counter()
    torch.manual_seed(seed)
    model: nn.Module = DigitsCNN()
    if method != PLAIN:
        try:
            layer_class(method)
            model, report = convert(
                model, method, return_report=True, **DEMO_METHODS.get(method, {})
            )
        except NotImplementedError:
            result.status = UNAVAILABLE
            return result
        result.converted, result.skipped = len(report.converted), dict(report.skipped)
    train(model, data, steps, AUX_LOSS_WEIGHTS.get(method), seed=seed, label=method)
    result.structure = summarise_structure(model)
    predictions = predict(model, data.x_test)
    result.accuracy = float((predictions == data.y_test).float().mean())
    try:
        deployed = deploy(model, example_input=data.x_test[:64])
    except DeployVerificationError as error:
        result.status = f"deploy verification failed: {error}"
        return result
    deployed_predictions = predict(deployed, data.x_test)
    result.accuracy_deployed = float((deployed_predictions == data.y_test).float().mean())
    result.changed_predictions = int((deployed_predictions != predictions).sum())
    if result.changed_predictions:
        result.status = f"deploy changed {result.changed_predictions} test predictions"
    counts = profile(model, (1, 1, 8, 8))
    result.params, result.params_deployed = counts["params"], counts["params_deployed"]
    result.macs, result.macs_active = counts["macs"], counts["macs_active"]
    x = data.x_test[torch.arange(latency_batch) % len(data.x_test)]
    result.latency_ms, result.latency_deployed_ms = paired_latency_ms(
        model, deployed, x, latency_reps
    )
    result.seconds = time.perf_counter() - started
    return result


def run_demo(
    methods: Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    *,
    latency_batch: int = 256,
    latency_reps: int = 7,
    seed: int = 0,
    on_result: Callable[[DemoResult], None] | None = None,
) -> list[DemoResult]:
    """One :class:`DemoResult` per method (``"plain"`` first, then :data:`DEMO_METHODS`).

    A method that is not implemented yet gets a row saying so; any other error in a method
    is recorded in its row's ``status`` (the others still run).
    """
    methods = [PLAIN, *DEMO_METHODS] if methods is None else list(methods)
    unknown = [m for m in methods if m != PLAIN and m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"methods must be among {[PLAIN, *DEMO_METHODS]}, got {unknown}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    data = load_digits_split(seed)
    results = []
    for method in methods:
        try:
            result = run_method(
                method,
                data,
                steps,
                latency_batch=latency_batch,
                latency_reps=latency_reps,
                seed=seed,
            )
        except Exception as error:  # one broken family must not hide the others' rows
            first_line = str(error).splitlines()[0] if str(error) else ""
            result = DemoResult(method, status=f"failed: {type(error).__name__}: {first_line}")
            traceback.print_exc(file=sys.stderr)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _cell(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = (
    "method",
    "acc",
    "acc deployed",
    "params",
    "params deployed",
    "MACs",
    "MACs active",
    "ms",
    "ms deployed",
    "converted/skipped",
    "structure / status",
)


def table_rows(results: Sequence[DemoResult]) -> list[list[str]]:
    rows = []
    for r in results:
        note = r.structure if r.status == "ok" else r.status
        counts = f"{r.converted}/{len(r.skipped)}"
        rows.append(
            [
                r.method,
                _cell(None if r.accuracy is None else 100 * r.accuracy, ".2f"),
                _cell(None if r.accuracy_deployed is None else 100 * r.accuracy_deployed, ".2f"),
                _cell(r.params, ","),
                _cell(r.params_deployed, ","),
                _cell(r.macs, ","),
                _cell(r.macs_active, ","),
                _cell(r.latency_ms, ".2f"),
                _cell(r.latency_deployed_ms, ".2f"),
                "-" if r.method == PLAIN or r.status == UNAVAILABLE else counts,
                note,
            ]
        )
    return rows


def format_table(results: Sequence[DemoResult]) -> str:
    """The demo's table (fixed-width text; numbers right-aligned)."""
    rows = [list(COLUMNS), *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    last = len(COLUMNS) - 1

    def line(row: list[str]) -> str:
        cells = [
            cell.ljust(widths[i]) if i in (0, last) else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(rows[0]))
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:]), rule])


def main(
    *,
    steps: int = DEFAULT_STEPS,
    methods: Sequence[str] | None = None,
    latency_batch: int = 256,
    latency_reps: int = 7,
    stream: TextIO | None = None,
) -> int:
    """Run the demo and print its table; 0 when every available method deployed exactly."""
    out = sys.stdout if stream is None else stream
    started = time.perf_counter()
    print(
        f"dynaconv demo: DigitsCNN on scikit-learn digits, {steps} SGD steps per method, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        file=out,
        flush=True,
    )

    def announce(result: DemoResult) -> None:
        took = f" ({result.seconds:.1f} s)" if result.seconds else ""
        print(f"  {result.method:9s} {result.status}{took}", file=out, flush=True)

    results = run_demo(
        methods,
        steps,
        latency_batch=latency_batch,
        latency_reps=latency_reps,
        on_result=announce,
    )
    print(file=out)
    print(format_table(results), file=out)
    print(
        "acc: test accuracy (%) before/after deploy; params: stored/deployed; MACs: dense/active "
        f"for one 8x8 image; ms: CPU inference of a batch of {latency_batch} before/after "
        "deploy (median).",
        file=out,
    )
    for r in results:
        for name, why in r.skipped.items():
            print(f"  {r.method}: kept {name} as nn.Conv2d ({why})", file=out)
    failed = [r.method for r in results if r.failed]
    print(
        f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all deployments verified'} "
        f"({time.perf_counter() - started:.0f} s)",
        file=out,
        flush=True,
    )
    return 1 if failed else 0
