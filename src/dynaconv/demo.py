"""``python -m dynaconv demo``: every method on scikit-learn's digits, end to end.

For the plain :class:`dynaconv.models.DigitsCNN` and for each method of :data:`DEMO_METHODS`,
the demo trains through the same :class:`dynaconv.train.engine.Trainer` as ``dynaconv train``
(:func:`demo_config`: the digits bundled with scikit-learn, offline; ``digits_cnn`` converted
with the method's options; the method's weight of :func:`dynaconv.aux_loss`; a fixed number
of SGD iterations), each in a fresh temporary run folder removed afterwards (or in
``OUT/METHOD`` when an output folder is given). It then brings the schedules to their end
(:func:`dynaconv.set_progress` 1.0), evaluates on the validation split, deploys with
verification, evaluates again, profiles and times CPU inference before and after deployment.
It prints one table; the exit status is non-zero when a deployment fails verification,
changes a prediction, or a method fails.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from .families import FamilyView
from .lifecycle import (
    DeployVerificationError,
    deploy,
    dynaconv_layers,
    set_progress,
)
from .profiling import profile
from .spec import check_int

__all__ = [
    "AUX_LOSS_WEIGHTS",
    "DEMO_METHODS",
    "DemoResult",
    "demo_config",
    "main",
    "run_demo",
]

#: Method -> options passed to :func:`dynaconv.convert` (``model.convert.options``); read-only,
#: what each layer class states (``example_options``, see :class:`dynaconv.layers.DynaConv2d`).
DEMO_METHODS: Mapping[str, Mapping[str, Any]] = FamilyView(
    lambda family: MappingProxyType(dict(family.layer.example_options))
)

#: Method -> weight of ``dynaconv.aux_loss(model)`` in the training loss (docs/methods.md: DGC's
#: lasso 1e-5; CondenseNet's group lasso is off in its CIFAR recipe; none for the others);
#: read-only, what each layer class states (``example_aux_loss_weight``).
AUX_LOSS_WEIGHTS: Mapping[str, float] = FamilyView(
    lambda family: family.layer.example_aux_loss_weight
)

PLAIN = "plain"
DEFAULT_STEPS = 200


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
        return self.status != "ok"


def demo_config(method: str, steps: int, out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """The resolved training configuration of one demo row (``method`` or ``"plain"``).

    ``digits_cnn`` on the digits dataset (batch 64, no augmentation), converted with
    :data:`DEMO_METHODS` ``[method]``; SGD (lr 0.1, Nesterov momentum 0.9, weight decay 1e-4)
    with a cosine schedule over exactly ``steps`` iterations; ``loss.aux_weight`` from
    :data:`AUX_LOSS_WEIGHTS`; on the CPU, validated once at the end, no tensorboard, plots or
    progress display; the run folder ``out_dir``.
    """
    from .train.config import resolve_config

    flags: dict[str, Any] = {
        "name": f"demo-{method}",
        "model.name": "digits_cnn",
        "data.dataset": "digits",
        "data.batch_size": 64,
        "data.augment": [],
        "optim.name": "sgd",
        "optim.lr": 0.1,
        "optim.momentum": 0.9,
        "optim.nesterov": True,
        "optim.weight_decay": 1e-4,
        "optim.schedule": "cosine",
        "optim.warmup_epochs": 0.0,
        "optim.min_lr": 0.0,
        "loss.aux_weight": AUX_LOSS_WEIGHTS.get(method, 0.0),
        "train.epochs": steps,  # an upper bound: the budget is train.max_iters
        "train.max_iters": steps,
        "train.eval_every_epochs": steps,  # validate after the last epoch only
        "train.device": "cpu",
        "train.seed": seed,
        "train.out_dir": str(out_dir),
        "train.tensorboard": False,
        "train.plots": False,
        "train.progress_bar": "none",
    }
    if method != PLAIN:
        flags["model.convert"] = {"method": method, "options": dict(DEMO_METHODS[method])}
    return resolve_config(None, flags)


def train(config: dict[str, Any]) -> Any:
    """Train ``config`` with :class:`~dynaconv.train.engine.Trainer` (quietly); the trainer."""
    from .train.engine import Trainer

    trainer = Trainer(config, verbose=False)
    trainer.fit()
    return trainer


def validation_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """All examples of ``dataset`` (the trainer's validation split) as ``(images, labels)``."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


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


@contextmanager
def _run_folder(method: str, out_dir: Path | None) -> Iterator[Path]:
    """``out_dir / method`` (kept), or a fresh temporary folder removed on exit."""
    if out_dir is not None:
        yield out_dir / method
        return
    with tempfile.TemporaryDirectory(prefix=f"dynaconv-demo-{method}-") as folder:
        yield Path(folder)


def run_method(
    method: str,
    steps: int,
    *,
    out_dir: Path | None = None,
    latency_batch: int = 256,
    latency_reps: int = 7,
    seed: int = 0,
) -> DemoResult:
    """Train (:func:`demo_config` through the Trainer), evaluate, deploy (verified), profile
    and time one method. ``out_dir``: keep the run in ``out_dir / method`` (None: a temporary
    folder, removed afterwards)."""
    result = DemoResult(method)
    started = time.perf_counter()
    with _run_folder(method, out_dir) as folder:
        trainer = train(demo_config(method, steps, folder, seed))
    report = trainer.conversion_report
    if report is not None:
        result.converted, result.skipped = len(report.converted), dict(report.skipped)
    model = trainer.eval_model()
    set_progress(model, 1.0)  # the schedules' end, as after a full training
    model.eval()
    result.structure = summarise_structure(model)
    _deploy_and_measure(
        result, model, *validation_tensors(trainer.val_set), latency_batch, latency_reps
    )
    result.seconds = time.perf_counter() - started
    return result


def _deploy_and_measure(
    result: DemoResult,
    model: nn.Module,
    x_test: Tensor,
    y_test: Tensor,
    latency_batch: int,
    latency_reps: int,
) -> None:
    """Fill ``result`` in: accuracies before/after a verified deploy, counts, latencies."""
    predictions = predict(model, x_test)
    result.accuracy = float((predictions == y_test).float().mean())
    try:
        deployed = deploy(model, example_input=x_test[:64])
    except DeployVerificationError as error:
        result.status = f"deploy verification failed: {error}"
        return
    deployed_predictions = predict(deployed, x_test)
    result.accuracy_deployed = float((deployed_predictions == y_test).float().mean())
    result.changed_predictions = int((deployed_predictions != predictions).sum())
    if result.changed_predictions:
        result.status = f"deploy changed {result.changed_predictions} test predictions"
    counts = profile(model, (1, *x_test.shape[1:]))
    result.params, result.params_deployed = counts["params"], counts["params_deployed"]
    result.macs, result.macs_active = counts["macs"], counts["macs_active"]
    x = x_test[torch.arange(latency_batch) % len(x_test)]
    result.latency_ms, result.latency_deployed_ms = paired_latency_ms(
        model, deployed, x, latency_reps
    )


def _check_arguments(
    methods: Sequence[str] | None, steps: Any, out_dir: str | Path | None
) -> tuple[list[str], Path | None]:
    """The methods to run (None: all) and the output folder; ``ValueError`` naming the
    argument for unknown methods, a bad step count, or an output folder that is a file or
    already holds a method's run."""
    methods = [PLAIN, *DEMO_METHODS] if methods is None else list(methods)
    unknown = [m for m in methods if m != PLAIN and m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"methods must be among {[PLAIN, *DEMO_METHODS]}, got {unknown}")
    check_int(steps, "steps")
    if out_dir is None:
        return methods, None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")
    from .train.runfolder import existing_artefacts

    for method in methods:
        held = existing_artefacts(out_dir / method)
        if held:
            raise ValueError(
                f"out_dir: {out_dir / method} already holds a run ({held[0].name}, ...); "
                "choose another output folder or remove it"
            )
    return methods, out_dir


def run_demo(
    methods: Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    *,
    out_dir: str | Path | None = None,
    latency_batch: int = 256,
    latency_reps: int = 7,
    seed: int = 0,
    on_result: Callable[[DemoResult], None] | None = None,
) -> list[DemoResult]:
    """One :class:`DemoResult` per method (``"plain"`` first, then :data:`DEMO_METHODS`).

    ``out_dir``: keep each method's run folder as ``out_dir/METHOD`` (None: temporary folders,
    removed). An error in a method is recorded in its row's ``status`` (the others still run).
    """
    methods, out = _check_arguments(methods, steps, out_dir)
    results = []
    for method in methods:
        try:
            result = run_method(
                method,
                steps,
                out_dir=out,
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
                "-" if r.method == PLAIN else counts,
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
    out_dir: str | Path | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run the demo and print its table; 0 when every available method deployed exactly.

    ``out_dir``: keep each method's run folder as ``out_dir/METHOD`` (default: temporary
    folders, removed). Bad arguments raise ``ValueError`` before anything runs.
    """
    _check_arguments(methods, steps, out_dir)
    out = sys.stdout if stream is None else stream
    started = time.perf_counter()
    print(
        f"dynaconv demo: DigitsCNN on scikit-learn digits, {steps} SGD steps per method "
        f"(dynaconv train's Trainer), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        file=out,
        flush=True,
    )

    def announce(result: DemoResult) -> None:
        took = f" ({result.seconds:.1f} s)" if result.seconds else ""
        print(f"  {result.method:9s} {result.status}{took}", file=out, flush=True)

    results = run_demo(
        methods,
        steps,
        out_dir=out_dir,
        latency_batch=latency_batch,
        latency_reps=latency_reps,
        on_result=announce,
    )
    print(file=out)
    print(format_table(results), file=out)
    print(
        "acc: accuracy (%) on the held-out validation digits before/after deploy; params: "
        "stored/deployed; MACs: dense/active "
        f"for one 8x8 image; ms: CPU inference of a batch of {latency_batch} before/after "
        "deploy (median).",
        file=out,
    )
    for r in results:
        for name, why in r.skipped.items():
            print(f"  {r.method}: kept {name} as nn.Conv2d ({why})", file=out)
    if out_dir is not None:
        print(f"  run folders: {Path(out_dir) / 'METHOD'}", file=out)
    failed = [r.method for r in results if r.failed]
    print(
        f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all deployments verified'} "
        f"({time.perf_counter() - started:.0f} s)",
        file=out,
        flush=True,
    )
    return 1 if failed else 0
