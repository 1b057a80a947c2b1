"""Accuracy study: one small CNN on Fashion-MNIST, plain and converted to every family.

The network (:class:`FashionCNN`, width ``w``, a power of two): a plain stem conv 3x3/2
(1 -> w, 28x28 -> 14x14), then six convs w -> w, each followed by BN-ReLU (so every converted
layer reads a BN-ReLU output, as DGC and CondenseNet's LGC expect): 3x3 and 1x1 at 14x14,
3x3/2 to 7x7, then 1x1, 3x3, 1x1 at 7x7; global average pool; linear to 10 classes. The six
inner convs are square with power-of-two channels, so every family converts the same six
layers (DGConv's ``C = 2^K``, LGC's ``C`` input groups and DGC's heads all apply); the stem
(one input channel) stays plain everywhere (``lgc-1x1``, the paper's placement, converts the
three 1x1 convs only).

Families (options passed to ``dynaconv.convert``; schedule and regulariser as METHODS.md):

* ``plain``: the network as built;
* ``doconv``: DO-Conv (``D_mul = M*N``), no regulariser;
* ``condconv``: CondConv with 8 experts, no regulariser;
* ``dgc``: DGC, 4 heads, half of the input channels kept (``gate_factor=0.5``), squeeze rate
  16, saliency lasso x 1e-5; its channel schedule follows ``set_progress``;
* ``dgconv``: DGConv under a 50% connection budget: ``dynaconv.ResourceConstraint(model, 0.5,
  "params", two_sided=True)`` multiplies the loss by ``(cost / budget)^0.02`` while over the
  budget and by ``(budget / cost)^0.02`` while under it; at progress 1/2 ``finalize()`` sets
  the gates to the structure closest to the budget at or under it and freezes them, and the
  second half of training fine-tunes the weights under that structure (the constraint is then
  inactive). Converted layers start from the plain conv's structure (one group) with the
  library's conversion margin (gates ``+0.1``);
* ``lgc-1x1``: CondenseNet's placement: the three 1x1 convs become LGC with ``G = C = 4``
  (condensation follows ``set_progress``, stages at progress 1/6, 1/3, 1/2; group lasso off,
  as in CondenseNet's CIFAR recipe) and the three 3x3 convs fixed group convolutions with 4
  groups (``nn.Conv2d(groups=4)``, freshly initialised), as CondenseNet's 3x3 convs;
* ``lgc``: this library's extension: LGC with ``G = C = 4`` on all six convs, 3x3 included
  (CondenseNet itself never condenses a 3x3 conv); same schedule and recipe.

Every family gets the same budget: the same epochs, SGD (Nesterov, momentum 0.9, weight
decay 1e-4, cosine learning rate per iteration from 0.1), batch 128, augmentation and, per
seed, the same initial weights of the plain layers and the same data order. After training
(progress 1) each model is evaluated on the test set, deployed (``dynaconv.deploy``, verified
on a test batch) and evaluated again: the table says whether the deployed model predicts
exactly the same test labels, for every seed. Parameters and MACs come from
``dynaconv.profile`` at batch 1; latency is the deployed model of the first seed at batch 1
and 256, median of interleaved samples after warm-up (``harness.measure_interleaved``).

Usage::

    python benchmarks/accuracy.py --time-only     # time 20 steps per family, print the total
    python benchmarks/accuracy.py                 # default: 3 seeds x 2 epochs, all 60k images
    python benchmarks/accuracy.py --full          # 5 seeds x 10 epochs, random 2 px shifts
    python benchmarks/accuracy.py --epochs 1 --train-subset 2000 --seeds 1   # smoke run
    python benchmarks/accuracy.py --no-latency --save-models DIR  # train on a busy machine...
    python benchmarks/accuracy.py --latency-from DIR              # ...time the models later

``--save-models DIR`` writes ``DIR/FAMILY-seedN.pt`` per run (both state dicts and what
rebuilds the networks, see :func:`load_saved`); ``--latency-from DIR`` times the lowest seed
of each family and rewrites the table in ``--out`` with the latency columns filled.

``--families`` picks rows (``plain`` is always trained unless ``--skip-plain``, which is meant
for a run whose table is merged later) and ``--first-seed F`` runs seeds ``F..F+N-1``;
``--merge OUT1 OUT2 ...`` builds one table from the ``accuracy.json`` files of several runs of
the same setting (a run of a later file replaces the run of the same family and seed of an
earlier one, so a rerun family replaces the old rows and split seeds add up) and writes it to
``--out``.

Expected from the papers (difference of means to ``plain``): DO-Conv and CondConv >= 0; DGC
at 50% kept >= -0.5 point; LGC with C=4 and DGConv under a 50% budget >= -1 point. The
``holds`` column reports whether each holds in this run; nothing is tuned to make it so. The
``kept / budget`` column gives DGConv's final fraction of the connections per seed against
its budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynaconv
from dynaconv.layers.dgconv.resource_constraint import closest_gate_counts
from evidence_common import (
    DEFAULT_FASHION_DIR,
    DEFAULT_PLOT_DIR,
    REPO,
    ImageData,
    format_mean_std,
    load_fashion_mnist,
    machine_line,
    machine_summary,
    markdown_table,
    mean_std,
    positive_int,
    random_shift,
    wrap_title,
    write_csv,
    write_json,
)
from harness import forward_fn, measure_interleaved

# --------------------------------------------------------------------------------------------
# the network and the families


class FashionCNN(nn.Module):
    """Stem conv3x3/2 (1 -> w), six convs w -> w with BN-ReLU, GAP, linear (module docstring)."""

    #: (kernel, stride) of the six inner convs.
    LAYOUT = ((3, 1), (1, 1), (3, 2), (1, 1), (3, 1), (1, 1))

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if width < 16 or width & (width - 1):
            raise ValueError(f"width must be a power of two >= 16, got {width}")
        self.stem = self._block(1, width, 3, 2)
        self.body = nn.Sequential(
            *(self._block(width, width, k, s) for k, s in self.LAYOUT),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    @staticmethod
    def _block(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.body(self.stem(x))).flatten(1))


@dataclass(frozen=True)
class Family:
    """One row of the study: how the plain network is converted and trained."""

    name: str
    method: str | None = None  # a dynaconv method, None for the plain network
    options: dict[str, Any] = field(default_factory=dict)
    aux_weight: float = 0.0  # weight of dynaconv.aux_loss(model)
    budget: float | None = None  # DGConv: fraction of the dense connections allowed
    two_sided: bool = False  # DGConv: ResourceConstraint(two_sided=)
    finalize_at: float | None = None  # DGConv: progress at which the structure is fixed
    convert_kernel: int | None = None  # convert only the inner convs of this kernel size
    fixed_groups: int = 1  # the other inner convs become nn.Conv2d(groups=fixed_groups)
    min_gap: float | None = None  # the papers' expectation: mean - plain mean >= min_gap
    expectation: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("plain"),
        Family("doconv", "doconv", min_gap=0.0, expectation=">= plain"),
        Family("condconv", "condconv", {"num_experts": 8}, min_gap=0.0, expectation=">= plain"),
        Family(
            "dgc",
            "dgc",
            {"heads": 4, "gate_factor": 0.5, "squeeze_rate": 16},
            aux_weight=1e-5,
            min_gap=-0.5,
            expectation="within 0.5",
        ),
        Family(
            "dgconv",
            "dgconv",
            budget=0.5,
            two_sided=True,
            finalize_at=0.5,
            min_gap=-1.0,
            expectation="within 1",
        ),
        Family(
            "lgc-1x1",
            "lgc",
            {"learned_groups": 4, "condense_factor": 4},
            min_gap=-1.0,
            expectation="within 1",
            convert_kernel=1,
            fixed_groups=4,
        ),
        Family(
            "lgc",
            "lgc",
            {"learned_groups": 4, "condense_factor": 4},
            min_gap=-1.0,
            expectation="within 1 (extension: all convs)",
        ),
    )
}

STEM = "stem.0"
TIMING_STEPS = 20


def converted_positions(family: Family) -> list[int]:
    """Indices in ``FashionCNN.body`` of the inner convs ``family`` converts."""
    return [
        i
        for i, (kernel, _) in enumerate(FashionCNN.LAYOUT)
        if family.convert_kernel is None or kernel == family.convert_kernel
    ]


def build_model(family: Family, width: int, seed: int) -> tuple[nn.Module, int]:
    """The seeded plain network converted to ``family``; also the number of converted layers.

    With ``convert_kernel`` only the inner convs of that kernel size are converted, and the
    others are replaced by fresh ``nn.Conv2d(groups=fixed_groups)`` of the same geometry.
    """
    torch.manual_seed(seed)
    model: nn.Module = FashionCNN(width)
    if family.method is None:
        return model, 0
    positions = converted_positions(family)
    for index, (kernel, stride) in enumerate(FashionCNN.LAYOUT):
        if index not in positions:
            model.body[index][0] = nn.Conv2d(
                width, width, kernel, stride, kernel // 2, groups=family.fixed_groups, bias=False
            )
    names = [f"body.{i}.0" for i in positions]
    model, report = dynaconv.convert(
        model, family.method, include=names, return_report=True, **family.options
    )
    if report.converted != names:
        raise RuntimeError(f"{family.name}: expected to convert {names}\n{report}")
    return model, len(report.converted)


# --------------------------------------------------------------------------------------------
# training and evaluation


@dataclass(frozen=True)
class Settings:
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    shift: int = 0  # random translation by up to this many pixels (0: no augmentation)
    width: int = 32


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (the run is reported as failed)."""


def train(
    model: nn.Module, family: Family, data: ImageData, settings: Settings, seed: int
) -> float:
    """SGD with the family's schedule (``set_progress``) and regulariser; returns seconds."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    constraint = (
        dynaconv.ResourceConstraint(model, family.budget, "params", two_sided=family.two_sided)
        if family.budget is not None
        else None
    )
    count = len(data.y_train)
    per_epoch = count // settings.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {settings.batch_size} exceeds the {count} training examples")
    total = settings.epochs * per_epoch
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(count, generator=generator)
        index = order[(step % per_epoch) * settings.batch_size :][: settings.batch_size]
        images = data.x_train[index]
        if settings.shift:
            images = random_shift(images, settings.shift, generator, data.background)
        dynaconv.set_progress(model, step / total)
        if (
            constraint is not None
            and family.finalize_at is not None
            and not constraint.finalized
            and step >= family.finalize_at * total
        ):
            constraint.finalize()  # fixes and freezes the gates; fine-tuning goes on
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * settings.lr * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(model(images), data.y_train[index])
        if family.aux_weight:
            loss = loss + family.aux_weight * dynaconv.aux_loss(model)
        if constraint is not None:
            loss = constraint(loss)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{family.name}: loss {float(loss)} at step {step} of {total}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    dynaconv.set_progress(model, 1.0)
    if constraint is not None and family.finalize_at is not None and not constraint.finalized:
        constraint.finalize()
    model.eval()
    return time.perf_counter() - started


def predict(model: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """Predicted labels, in eval mode, ``batch`` images at a time."""
    model.eval()
    with torch.inference_mode():
        return torch.cat(
            [model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
        )


def changed_predictions(before: Tensor, after: Tensor) -> int:
    """How many labels differ (``before`` and ``after`` must have the same shape)."""
    if before.shape != after.shape:
        raise ValueError(f"prediction shapes differ: {tuple(before.shape)} vs {tuple(after.shape)}")
    return int((before != after).sum())


def structure(model: nn.Module) -> str:
    """The converted layers' ``structure()`` strings, counted (``"2 groups x4; ..."``)."""
    counts: dict[str, int] = {}
    for _, layer in dynaconv.dynaconv_layers(model):
        text = layer.structure()
        if text:
            counts[text] = counts.get(text, 0) + 1
    return "; ".join(f"{text} x{n}" if n > 1 else text for text, n in counts.items())


@dataclass
class Run:
    """One family trained with one seed."""

    family: str
    seed: int
    status: str = "ok"
    accuracy: float | None = None
    accuracy_deployed: float | None = None
    changed: int | None = None  # test labels that changed at deployment
    params: int | None = None
    params_deployed: int | None = None
    macs: int | None = None
    macs_active: int | None = None
    converted: int = 0
    structure: str = ""
    connections_kept: float | None = None  # DGConv: cost / dense cost of its resource budget
    closest_under_budget: float | None = None  # DGConv: the closest achievable fraction <= budget
    train_seconds: float = 0.0


def run_one(
    family: Family, seed: int, data: ImageData, settings: Settings
) -> tuple[Run, nn.Module | None, nn.Module | None]:
    """Train, evaluate, deploy (verified), evaluate again and profile one family and seed."""
    run = Run(family.name, seed)
    try:
        model, run.converted = build_model(family, settings.width, seed)
        run.train_seconds = train(model, family, data, settings, seed)
        before = predict(model, data.x_test)
        run.accuracy = float((before == data.y_test).float().mean())
        deployed = dynaconv.deploy(model, example_input=data.x_test[:256])
        after = predict(deployed, data.x_test)
        run.accuracy_deployed = float((after == data.y_test).float().mean())
        run.changed = changed_predictions(before, after)
        counts = dynaconv.profile(model, (1, *data.x_test.shape[1:]))
        run.params, run.params_deployed = counts["params"], counts["params_deployed"]
        run.macs, run.macs_active = counts["macs"], counts["macs_active"]
        run.structure = structure(model)
        if family.budget is not None:
            constraint = dynaconv.ResourceConstraint(model, family.budget, "params")
            run.connections_kept = float(constraint.cost().detach()) / constraint.dense
            run.closest_under_budget = closest_achievable_fraction(constraint)
            run.structure += (
                f"; {100 * run.connections_kept:.0f}% of the connections kept "
                f"(budget {100 * family.budget:.0f}%)"
            )
        return run, model, deployed
    except Exception as error:  # one failing family must not hide the others' rows
        traceback.print_exc(file=sys.stderr)
        run.status = (
            f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        return run, None, None


def closest_achievable_fraction(constraint: dynaconv.ResourceConstraint) -> float:
    """The largest fraction of the dense cost any gate pattern reaches at or under the budget
    (the cheapest structure's fraction when none fits); the model is not changed."""
    costs = [
        [scale * 2 ** (layer.num_gates + n) for n in range(layer.num_gates + 1)]
        for layer, scale in zip(constraint.layers, constraint.scales, strict=True)
    ]
    penalties = [[0.0] * len(c) for c in costs]
    counts = closest_gate_counts(costs, penalties, constraint.budget)
    return sum(c[n] for c, n in zip(costs, counts, strict=True)) / constraint.dense


def latencies(
    deployed: dict[str, nn.Module], images: Tensor, batches: Sequence[int], reps: int, warmup: int
) -> dict[str, dict[int, float]]:
    """Median milliseconds per forward of each deployed model at each batch (interleaved)."""
    result: dict[str, dict[int, float]] = {name: {} for name in deployed}
    for batch in batches:
        x = images[torch.arange(batch) % len(images)]
        fns = {name: forward_fn(model.eval(), x) for name, model in deployed.items()}
        for name, ms in measure_interleaved(fns, torch.device("cpu"), warmup, reps).items():
            result[name][batch] = ms
    return result


def saved_model_path(directory: Path, family: str, seed: int) -> Path:
    """Where ``--save-models`` writes one family and seed."""
    return directory / f"{family}-seed{seed}.pt"


def save_models(
    directory: Path,
    family: Family,
    seed: int,
    settings: Settings,
    model: nn.Module,
    deployed: nn.Module,
) -> Path:
    """Write the trained and the deployed model's state, and what rebuilds them.

    The file (``torch.save``, loadable with ``weights_only=True``) holds the family's name, the
    seed, the settings and both state dicts; :func:`load_saved` rebuilds the networks from them.
    """
    path = saved_model_path(directory, family.name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "family": family.name,
        "seed": seed,
        "settings": asdict(settings),
        "trained": model.state_dict(),
        "deployed": deployed.state_dict(),
    }
    torch.save(payload, path)
    return path


def load_saved(path: Path, example_input: Tensor) -> tuple[str, int, nn.Module, nn.Module]:
    """Family name, seed, trained model and deployed model from a :func:`save_models` file.

    The trained model is rebuilt (:func:`build_model` at progress 1) and given its saved state;
    it is deployed again (verified on ``example_input``) and the deployed model's saved state
    is loaded strictly into the result, so a structure that differs from the saved one raises.
    """
    payload = torch.load(path, weights_only=True)
    family = FAMILIES[payload["family"]]
    model, _ = build_model(family, payload["settings"]["width"], payload["seed"])
    dynaconv.set_progress(model, 1.0)
    model.load_state_dict(payload["trained"])
    model.eval()
    deployed = dynaconv.deploy(model, example_input=example_input)
    deployed.load_state_dict(payload["deployed"])
    return family.name, payload["seed"], model, deployed.eval()


def first_saved(directory: Path, families: Sequence[Family]) -> dict[str, Path]:
    """The saved file of each family's lowest seed in ``directory`` (families without one left out)."""
    found: dict[str, Path] = {}
    for family in families:
        paths = sorted(
            directory.glob(f"{family.name}-seed*.pt"),
            key=lambda p: int(p.stem.rsplit("-seed", 1)[1]),
        )
        if paths:
            found[family.name] = paths[0]
    return found


def seconds_per_step(
    family: Family, data: ImageData, settings: Settings, steps: int = TIMING_STEPS
) -> float:
    """Wall seconds of one training step of ``family`` (``steps`` steps on the first images)."""
    count = steps * settings.batch_size
    if len(data.y_train) < count:
        raise ValueError(f"timing needs {count} training images, the data has {len(data.y_train)}")
    subset = ImageData(
        data.x_train[:count], data.y_train[:count], data.x_test, data.y_test, data.background
    )
    model, _ = build_model(family, settings.width, seed=0)
    return train(model, family, subset, replace(settings, epochs=1), seed=0) / steps


def expected_minutes(
    step_seconds: dict[str, float], train_images: int, settings: Settings, seeds: int
) -> float:
    """Training time of the whole study (evaluation, deployment and latency not included)."""
    steps = settings.epochs * (train_images // settings.batch_size)
    return sum(step_seconds.values()) * steps * seeds / 60


# --------------------------------------------------------------------------------------------
# the table


def headers(batches: Sequence[int] = (1, 256)) -> tuple[str, ...]:
    """The table's columns (one latency column per batch size)."""
    return (
        "family",
        "test acc % (mean ± std)",
        "vs plain (points)",
        "paper expects",
        "holds",
        "params stored",
        "params deployed",
        "MACs dense",
        "MACs active",
        "kept / budget",
        *(f"ms batch {b}" for b in batches),
        "deployed = same test labels",
        "seeds",
    )


HEADERS = headers()


def _mean_int(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{round(sum(values) / len(values)):,} ({low:,}-{high:,})"


def _same_labels_text(done: Sequence[Run]) -> str:
    same = sum(r.changed == 0 for r in done)
    if same == len(done):
        return f"yes ({same}/{len(done)} seeds)"
    changed = sum(r.changed or 0 for r in done)
    return f"NO: {len(done) - same}/{len(done)} seeds changed {changed} labels"


def _budget_cell(family: Family, done: Sequence[Run]) -> str:
    """DGConv: the kept fraction of each seed, the budget, and whether every seed is within 5
    points under it (or at the closest achievable structure)."""
    if family.budget is None:
        return "-"
    kept = [r.connections_kept for r in done]
    if any(k is None for k in kept):
        return "not recorded"
    text = "/".join(f"{100 * k:.0f}" for k in kept) + f"% of {100 * family.budget:.0f}%"
    return f"{text} ({'met' if _budget_met(family, done) else 'MISSED'})"


def _budget_met(family: Family, done: Sequence[Run]) -> bool:
    """Every seed at or under the budget by at most 5 points, or at the closest achievable."""
    assert family.budget is not None
    for run in done:
        kept, closest = run.connections_kept, run.closest_under_budget
        if kept is None:
            return False
        at_closest = closest is not None and abs(kept - closest) < 1e-12
        if not (family.budget - 0.05 <= kept <= family.budget or at_closest):
            return False
    return True


def _latency_cell(ms: dict[int, float], batch: int, measured: bool) -> str:
    if not measured:
        return "not measured"
    return f"{ms[batch]:.3f}" if batch in ms else "-"


def _holds(family: Family, gap: float | None) -> str:
    if gap is None or family.min_gap is None:
        return ""
    return "yes" if gap >= family.min_gap else "MISS"


def summarise(
    families: Sequence[Family],
    runs: Sequence[Run],
    latency: dict[str, dict[int, float]] | None,
    batches: Sequence[int] = (1, 256),
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Table rows (strings, columns of :func:`headers`) and machine-readable summaries.

    ``latency`` ``None`` means latency was not measured (``--no-latency``): those cells say so.
    """
    ok = {f.name: [r for r in runs if r.family == f.name and r.status == "ok"] for f in families}
    plain = ok.get("plain") or []
    plain_mean = mean_std([100 * r.accuracy for r in plain])[0] if plain else None
    width = len(headers(batches))
    rows, records = [], []
    for family in families:
        done = ok[family.name]
        failures = [r.status for r in runs if r.family == family.name and r.status != "ok"]
        record: dict[str, Any] = {"family": family.name, "seeds": len(done), "failed": failures}
        records.append(record)
        if not done:
            rows.append([family.name, failures[0] if failures else "no run", *["-"] * (width - 2)])
            continue
        accs = [100 * r.accuracy for r in done]
        mean, std = mean_std(accs)
        gap = None if plain_mean is None or family.name == "plain" else mean - plain_mean
        holds = _holds(family, gap)
        ms = latency.get(family.name, {}) if latency is not None else {}
        record.update(
            accuracy_mean=mean,
            accuracy_std=std,
            accuracies=accs,
            gap_to_plain=gap,
            expectation=family.expectation,
            holds=holds or None,
            params=[r.params for r in done],
            params_deployed=[r.params_deployed for r in done],
            macs=[r.macs for r in done],
            macs_active=[r.macs_active for r in done],
            latency_ms=None if latency is None else {str(b): ms.get(b) for b in batches},
            same_labels_all_seeds=all(r.changed == 0 for r in done),
            changed_labels=[r.changed for r in done],
            structure=[r.structure for r in done],
            connections_kept=[r.connections_kept for r in done],
            budget=family.budget,
            budget_met=None if family.budget is None else _budget_met(family, done),
            train_seconds=[r.train_seconds for r in done],
        )
        rows.append(
            [
                family.name,
                format_mean_std(accs),
                "-" if gap is None else f"{gap:+.2f}",
                family.expectation or "-",
                holds or "-",
                _mean_int([r.params for r in done]),
                _mean_int([r.params_deployed for r in done]),
                _mean_int([r.macs for r in done]),
                _mean_int([r.macs_active for r in done]),
                _budget_cell(family, done),
                *(_latency_cell(ms, b, measured=latency is not None) for b in batches),
                _same_labels_text(done),
                str(len(done)) + (f" ({len(failures)} failed)" if failures else ""),
            ]
        )
    return rows, records


def plot_accuracy_vs_macs(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Mean test accuracy (error bar: std over seeds) against active MACs, one point per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for record in records:
        if "accuracy_mean" not in record:
            continue
        macs = sum(record["macs_active"]) / len(record["macs_active"]) / 1e6
        ax.errorbar(
            macs,
            record["accuracy_mean"],
            yerr=record["accuracy_std"] or 0.0,
            fmt="o",
            capsize=4,
            label=record["family"],
        )
        ax.annotate(
            record["family"],
            (macs, record["accuracy_mean"]),
            textcoords="offset points",
            xytext=(6, 4),
        )
    plain = next((r for r in records if r["family"] == "plain" and "accuracy_mean" in r), None)
    if plain is not None:
        ax.axhline(plain["accuracy_mean"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("active MACs per image (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(wrap_title(title), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line

DEFAULT = {"epochs": 2, "train_subset": None, "seeds": 3, "shift": 0}
FULL = {"epochs": 10, "train_subset": None, "seeds": 5, "shift": 2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help=f"the long setting: {FULL}")
    parser.add_argument(
        "--time-only",
        action="store_true",
        help=f"time {TIMING_STEPS} training steps of each family, print the expected total, stop",
    )
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds 0..N-1")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="start at this seed (seeds F..F+N-1), to split seeds over runs joined by --merge",
    )
    parser.add_argument(
        "--train-subset", type=positive_int, default=None, help="first N training images"
    )
    parser.add_argument("--all-train", action="store_true", help="all 60,000 training images")
    parser.add_argument(
        "--test-subset", type=positive_int, default=None, help="first N test images (default all)"
    )
    parser.add_argument("--shift", type=int, default=None, help="random shift augmentation (px)")
    parser.add_argument("--width", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="NAME"
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_FASHION_DIR)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    parser.add_argument(
        "--latency-batches", type=positive_int, nargs="+", default=[1, 256], metavar="B"
    )
    parser.add_argument("--latency-reps", type=positive_int, default=20)
    parser.add_argument(
        "--no-latency",
        action="store_true",
        help="skip timing (the latency columns say 'not measured'); see --latency-from",
    )
    parser.add_argument(
        "--save-models",
        type=Path,
        default=None,
        metavar="DIR",
        help="save each trained and deployed model (state + what rebuilds it) as DIR/FAMILY-seedN.pt",
    )
    parser.add_argument(
        "--latency-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="only time the deployed models saved in DIR by --save-models (lowest seed of each "
        "family) at --latency-batches; merge into the table of the training run in --out "
        "(its accuracy.json) when there is one",
    )
    parser.add_argument("--latency-warmup", type=positive_int, default=3)
    parser.add_argument(
        "--skip-plain",
        action="store_true",
        help="do not train plain (for a run whose table is merged later with --merge)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="OUT",
        help="only build one table from the accuracy.json in each OUT folder (same setting; a "
        "run in a later folder replaces the run of the same family and seed), into --out",
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "accuracy")
    parser.add_argument("--plot-dir", type=Path, default=DEFAULT_PLOT_DIR)
    args = parser.parse_args(argv)
    preset = FULL if args.full else DEFAULT
    args.epochs = args.epochs or preset["epochs"]
    args.seeds = args.seeds or preset["seeds"]
    args.shift = preset["shift"] if args.shift is None else args.shift
    if args.shift < 0:
        parser.error(f"--shift must be >= 0, got {args.shift}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.all_train:
        args.train_subset = None
    elif args.train_subset is None:
        args.train_subset = preset["train_subset"]
    if "plain" not in args.families and not args.skip_plain:
        args.families = ["plain", *args.families]
    return args


def command_line(argv: Sequence[str] | None) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    return "python benchmarks/accuracy.py" + "".join(f" {w}" for w in words)


TITLE = "Accuracy study: FashionCNN on Fashion-MNIST"


def report_text(
    header: str, command: str, batches: Sequence[int], rows: list[list[str]], runs: Sequence[Run]
) -> str:
    """The printed report: title, setting and machine line, command, table, learned structure."""
    first = min((r.seed for r in runs), default=0)
    return "\n".join(
        [
            f"## {TITLE}",
            header,
            f"command: `{command}`",
            "",
            markdown_table(headers(batches), rows),
            "",
            "Learned structure (first seed): "
            + "; ".join(
                f"{r.family}: {r.structure}" for r in runs if r.seed == first and r.structure
            ),
        ]
    )


def write_report(
    args: argparse.Namespace,
    text: str,
    batches: Sequence[int],
    rows: list[list[str]],
    records: list[dict[str, Any]],
    runs: Sequence[Run],
    payload: dict[str, Any],
) -> None:
    """accuracy.md / .csv / _runs.csv / .json in ``--out`` and the plot in ``--plot-dir``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.md").write_text(text + "\n")
    write_csv(args.out / "accuracy.csv", headers(batches), rows)
    run_fields = list(asdict(runs[0])) if runs else []
    write_csv(args.out / "accuracy_runs.csv", run_fields, [list(asdict(r).values()) for r in runs])
    write_json(args.out / "accuracy.json", payload | {"summary": records})
    plot = args.plot_dir / "accuracy_vs_macs.png"
    plot_accuracy_vs_macs(records, plot, f"FashionCNN, Fashion-MNIST: {payload['setting']}")
    print(f"\nwrote {args.out}/accuracy.md, .csv, _runs.csv, .json and {plot}")


def latency_pass(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--latency-from DIR``: time the saved deployed models (first seed of each family).

    Prints the latencies; when ``--out`` holds the training run's ``accuracy.json``, its table
    is written again with the latency columns filled (the accuracy columns unchanged).
    """
    families = [FAMILIES[name] for name in args.families]
    saved = first_saved(args.latency_from, families)
    if not saved:
        raise SystemExit(
            f"--latency-from: no saved models (FAMILY-seedN.pt) in {args.latency_from}"
        )
    data = load_fashion_mnist(args.data_dir, 1, args.test_subset)
    machine = machine_line()
    print(f"accuracy study, latency of the deployed models in {args.latency_from}\n{machine}")
    deployed, seeds = {}, {}
    for name, path in saved.items():
        _, seeds[name], _, deployed[name] = load_saved(path, data.x_test[:256])
    batches = tuple(args.latency_batches)
    latency = latencies(deployed, data.x_test, batches, args.latency_reps, args.latency_warmup)
    latency_command = command_line(argv)
    lat_headers = ("family", "seed", *(f"ms batch {b}" for b in batches))
    lat_rows = [[n, str(seeds[n]), *(f"{latency[n][b]:.3f}" for b in batches)] for n in latency]
    print(f"command: `{latency_command}`\n\n{markdown_table(lat_headers, lat_rows)}", flush=True)
    previous = args.out / "accuracy.json"
    if not previous.is_file():
        print(f"\n(no {previous}: latency not merged into an accuracy table)")
        return 0
    payload = json.loads(previous.read_text())
    runs = [Run(**r) for r in payload["runs"]]
    trained = [FAMILIES[name] for name in payload["families"]]
    rows, records = summarise(trained, runs, latency, batches)
    latency_note = {
        "command": latency_command,
        "machine": machine_summary(),
        "machine_line": machine,
        "seeds": seeds,
        "reps": args.latency_reps,
        "warmup": args.latency_warmup,
    }
    header = f"{payload['header']}\nlatency: {machine}; `{latency_command}`"
    text = report_text(header, payload["command"], batches, rows, runs)
    print("\n" + text, flush=True)
    write_report(args, text, batches, rows, records, runs, payload | {"latency": latency_note})
    return 0


def merge_payloads(payloads: Sequence[dict[str, Any]]) -> tuple[list[Family], list[Run]]:
    """Families (in :data:`FAMILIES` order) and runs of several runs of one setting.

    A run of a later payload replaces the run of the same family and seed from earlier ones
    (so a rerun family replaces the old one, and runs of different seeds add up); payloads of
    different settings raise ``ValueError``.
    """
    if not payloads:
        raise ValueError("nothing to merge")
    settings = [p["settings"] for p in payloads]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError(f"cannot merge runs of different settings: {settings}")
    by_key: dict[tuple[str, int], Run] = {}
    for payload in payloads:
        for record in payload["runs"]:
            by_key[(record["family"], record["seed"])] = Run(**record)
    names = {family for family, _ in by_key}
    unknown = sorted(names - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families in the merged runs: {unknown}")
    families = [f for name, f in FAMILIES.items() if name in names]
    runs = sorted(by_key.values(), key=lambda r: (r.seed, list(FAMILIES).index(r.family)))
    return families, runs


def merge_pass(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--merge OUT...``: one table from several runs' ``accuracy.json``, written to ``--out``."""
    payloads = [json.loads((folder / "accuracy.json").read_text()) for folder in args.merge]
    try:
        families, runs = merge_payloads(payloads)
    except ValueError as error:
        raise SystemExit(f"--merge: {error}") from None
    batches = tuple(args.latency_batches)
    rows, records = summarise(families, runs, None, batches)
    header = "\n".join(
        f"{p['header']}; `{p['command']}` ({', '.join(p['families'])})" for p in payloads
    )
    command = command_line(argv)
    text = report_text(f"merged runs:\n{header}", command, batches, rows, runs)
    print(text, flush=True)
    payload = {
        "title": TITLE,
        "setting": payloads[0]["setting"],
        "header": header,
        "command": command,
        "machine": payloads[-1]["machine"],
        "settings": payloads[0]["settings"],
        "families": {f.name: asdict(f) for f in families},
        "runs": [asdict(r) for r in runs],
        "merged_from": [
            {"command": p["command"], "header": p["header"], "families": list(p["families"])}
            for p in payloads
        ],
        "elapsed_s": sum(p.get("elapsed_s", 0.0) for p in payloads),
    }
    write_report(args, text, batches, rows, records, runs, payload)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; 0 when every run finished and every deployment kept every test label."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.latency_from is not None:
        return latency_pass(args, argv)
    if args.merge is not None:
        return merge_pass(args, argv)
    started = time.perf_counter()
    families = [FAMILIES[name] for name in args.families]
    settings = Settings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        shift=args.shift,
        width=args.width,
    )
    data = load_fashion_mnist(args.data_dir, args.train_subset, args.test_subset)
    setting_text = (
        f"{len(data.y_train):,} training / {len(data.y_test):,} test images, {args.epochs} epochs, "
        f"batch {args.batch_size}, SGD lr {args.lr} cosine, shift {args.shift}px, width "
        f"{args.width}, seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
    )
    print(f"accuracy study: {setting_text}\n{machine_line()}", flush=True)
    if args.time_only:
        step_s = {f.name: seconds_per_step(f, data, settings) for f in families}
        total = expected_minutes(step_s, len(data.y_train), settings, args.seeds)
        per_step = ", ".join(f"{name} {1e3 * s:.0f}" for name, s in step_s.items())
        print(f"ms per training step: {per_step}")
        print(f"expected training time of the whole study: {total:.0f} min")
        return 0
    runs: list[Run] = []
    first_deployed: dict[str, nn.Module] = {}
    for seed in range(
        args.first_seed, args.first_seed + args.seeds
    ):  # seeds outside: load drift spreads over every family
        for family in families:
            run, model, deployed = run_one(family, seed, data, settings)
            runs.append(run)
            if deployed is not None and args.save_models is not None:
                save_models(args.save_models, family, seed, settings, model, deployed)
            if deployed is not None and family.name not in first_deployed:
                first_deployed[family.name] = deployed
            acc = "-" if run.accuracy is None else f"{100 * run.accuracy:.2f}%"
            print(
                f"  seed {seed} {family.name:9s} {run.status} acc {acc} changed "
                f"{run.changed} ({run.train_seconds:.0f} s)",
                flush=True,
            )
    latency_batches = tuple(args.latency_batches)
    latency = (
        None
        if args.no_latency
        else latencies(
            first_deployed, data.x_test, latency_batches, args.latency_reps, args.latency_warmup
        )
    )
    rows, records = summarise(families, runs, latency, latency_batches)
    elapsed = time.perf_counter() - started
    header = f"{setting_text}; {machine_line()}; total {elapsed / 60:.1f} min"
    text = report_text(header, command_line(argv), latency_batches, rows, runs)
    print("\n" + text, flush=True)
    payload = {
        "title": TITLE,
        "setting": setting_text,
        "header": header,
        "command": command_line(argv),
        "machine": machine_summary(),
        "settings": asdict(settings),
        "families": {f.name: asdict(f) for f in families},
        "runs": [asdict(r) for r in runs],
        "elapsed_s": elapsed,
    }
    write_report(args, text, latency_batches, rows, records, runs, payload)
    failed = [r for r in runs if r.status != "ok" or r.changed]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
