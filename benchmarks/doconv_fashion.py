"""The DO-Conv paper's small demo, on Fashion-MNIST: plain convs against DO-Conv.

Network (the paper's demo): three 3x3 convs with stride 2 and padding 1, 1 -> 16 -> 16 -> 10
channels (28 -> 14 -> 7 -> 4), each followed by ReLU, then global average pooling gives the
10 logits. Training: SGD, learning rate 0.01 (constant), momentum 0.9, no weight decay,
batch 32, 15 epochs, no augmentation, five seeds. Per seed the plain network and its DO-Conv
conversion start from the same function (``dynaconv.convert`` keeps the plain kernel, ``D``
starts at zero) and see the same data order; the DO-Conv network is deployed (folded into
plain convs) and must predict the same test labels.

Reported: test accuracy after the last epoch per seed, mean ± std of each, and the paired
difference DO-Conv - plain per seed with its mean ± std (and standard error). The paper reports
95.156% -> 95.674% (+0.518, mean of 5 runs) on MNIST; this demo runs on Fashion-MNIST, so only
the sign and size of the gap relative to its spread are comparable.

    python benchmarks/doconv_fashion.py               # 5 seeds x 15 epochs x 2 networks
    python benchmarks/doconv_fashion.py --time-only   # time one epoch, print the expected total
    python benchmarks/doconv_fashion.py --epochs 1 --train-subset 2000 --seeds 1   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynaconv
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
    wrap_title,
    write_csv,
    write_json,
)

VARIANTS = ("plain", "doconv")
PAPER_MNIST = (95.156, 95.674)


class DemoNet(nn.Module):
    """conv3x3/2 (1->16) - ReLU - conv3x3/2 (16->16) - ReLU - conv3x3/2 (16->10) - ReLU - GAP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 10, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return x.mean(dim=(2, 3))


def build_pair(seed: int) -> dict[str, nn.Module]:
    """The seeded plain network and its DO-Conv conversion (the same function at start)."""
    torch.manual_seed(seed)
    plain = DemoNet()
    return {"plain": plain, "doconv": dynaconv.convert(copy.deepcopy(plain), "doconv")}


@dataclass(frozen=True)
class Settings:
    epochs: int = 15
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9


def predictions(model: nn.Module, images: Tensor, batch: int = 2000) -> Tensor:
    """Predicted labels in eval mode."""
    model.eval()
    with torch.inference_mode():
        return torch.cat(
            [model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
        )


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((predictions(model, images) == labels).float().mean())


@dataclass
class History:
    """Test accuracy after every epoch and the seconds each epoch took."""

    test_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    data: ImageData,
    settings: Settings,
    seed: int,
    epochs: int | None = None,
) -> History:
    """Constant-learning-rate SGD; the data order depends only on ``seed``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    generator = torch.Generator().manual_seed(seed)
    count = len(data.y_train)
    history = History()
    for _ in range(settings.epochs if epochs is None else epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - settings.batch_size + 1, settings.batch_size):
            index = order[start : start + settings.batch_size]
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {float(loss)} (seed {seed})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.epoch_seconds.append(time.perf_counter() - started)
        history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
    return history


@dataclass
class SeedResult:
    seed: int
    plain: float
    doconv: float
    deployed_changed_labels: int
    plain_curve: list[float]
    doconv_curve: list[float]
    plain_epoch_s: float
    doconv_epoch_s: float

    @property
    def gap(self) -> float:
        return self.doconv - self.plain


def run_seed(seed: int, data: ImageData, settings: Settings) -> SeedResult:
    models = build_pair(seed)
    histories = {name: train(models[name], data, settings, seed) for name in VARIANTS}
    doconv = models["doconv"]
    deployed = dynaconv.deploy(doconv, example_input=data.x_test[:256])
    changed = int((predictions(doconv, data.x_test) != predictions(deployed, data.x_test)).sum())
    return SeedResult(
        seed,
        100 * histories["plain"].test_accuracy[-1],
        100 * histories["doconv"].test_accuracy[-1],
        changed,
        [100 * a for a in histories["plain"].test_accuracy],
        [100 * a for a in histories["doconv"].test_accuracy],
        statistics.median(histories["plain"].epoch_seconds),
        statistics.median(histories["doconv"].epoch_seconds),
    )


def time_one_epoch(data: ImageData, settings: Settings) -> dict[str, float]:
    """Seconds of one training epoch of each variant (seed 0)."""
    models = build_pair(0)
    return {
        name: train(models[name], data, settings, 0, epochs=1).epoch_seconds[0] for name in VARIANTS
    }


def expected_total_s(epoch_s: dict[str, float], epochs: int, seeds: int) -> float:
    return sum(epoch_s.values()) * epochs * seeds


# --------------------------------------------------------------------------------------------
# report


SEED_HEADERS = ("seed", "plain %", "DO-Conv %", "DO-Conv - plain", "deployed = same labels")
SUMMARY_HEADERS = ("", "plain", "DO-Conv", "DO-Conv - plain (paired)")


def tables(results: Sequence[SeedResult]) -> tuple[list[list[str]], list[list[str]], dict]:
    seed_rows = [
        [
            str(r.seed),
            f"{r.plain:.2f}",
            f"{r.doconv:.2f}",
            f"{r.gap:+.2f}",
            "yes"
            if r.deployed_changed_labels == 0
            else f"NO ({r.deployed_changed_labels} changed)",
        ]
        for r in results
    ]
    gaps = [r.gap for r in results]
    gap_mean, gap_std = mean_std(gaps)
    stderr = None if gap_std is None else gap_std / math.sqrt(len(gaps))
    wins = sum(g > 0 for g in gaps)
    summary_rows = [
        [
            f"test accuracy % (mean ± std, {len(results)} seed{'s' if len(results) > 1 else ''})",
            format_mean_std([r.plain for r in results]),
            format_mean_std([r.doconv for r in results]),
            format_mean_std(gaps, digits=2)
            + ("" if stderr is None else f" (standard error {stderr:.2f})"),
        ],
        [
            "per-seed range",
            f"{min(r.plain for r in results):.2f}-{max(r.plain for r in results):.2f}",
            f"{min(r.doconv for r in results):.2f}-{max(r.doconv for r in results):.2f}",
            f"{min(gaps):+.2f} to {max(gaps):+.2f}; DO-Conv ahead in {wins}/{len(gaps)} seeds",
        ],
        [
            "paper (MNIST, 5 runs)",
            f"{PAPER_MNIST[0]:.3f}",
            f"{PAPER_MNIST[1]:.3f}",
            f"{PAPER_MNIST[1] - PAPER_MNIST[0]:+.3f}",
        ],
    ]
    record = {
        "plain_mean_std": mean_std([r.plain for r in results]),
        "doconv_mean_std": mean_std([r.doconv for r in results]),
        "gap_mean": gap_mean,
        "gap_std": gap_std,
        "gap_stderr": stderr,
        "doconv_ahead_seeds": wins,
        "all_deployed_same_labels": all(r.deployed_changed_labels == 0 for r in results),
    }
    return seed_rows, summary_rows, record


def plot_curves(results: Sequence[SeedResult], path: Path, title: str) -> None:
    """Mean test accuracy per epoch (band: min-max over seeds) for both networks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label in (("plain_curve", "plain"), ("doconv_curve", "DO-Conv")):
        curves = torch.tensor([getattr(r, name) for r in results])
        epochs = range(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0).tolist(), marker="o", markersize=3, label=label)
        ax.fill_between(
            epochs, curves.min(0).values.tolist(), curves.max(0).values.tolist(), alpha=0.2
        )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(wrap_title(title), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=positive_int, default=15)
    parser.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1")
    parser.add_argument("--train-subset", type=positive_int, default=None)
    parser.add_argument("--test-subset", type=positive_int, default=None)
    parser.add_argument("--time-only", action="store_true", help="time one epoch and stop")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_FASHION_DIR)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "doconv_fashion")
    parser.add_argument("--plot-dir", type=Path, default=DEFAULT_PLOT_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when every deployed DO-Conv network kept every test label."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(epochs=args.epochs)
    data = load_fashion_mnist(args.data_dir, args.train_subset, args.test_subset)
    setting_text = (
        f"{len(data.y_train):,} training / {len(data.y_test):,} test images, {args.epochs} epochs, "
        f"batch {settings.batch_size}, SGD lr {settings.lr} momentum {settings.momentum}, "
        f"seeds 0-{args.seeds - 1}"
    )
    print(f"DO-Conv demo on Fashion-MNIST: {setting_text}\n{machine_line()}", flush=True)
    if args.time_only:
        epoch_s = time_one_epoch(data, settings)
        total = expected_total_s(epoch_s, args.epochs, args.seeds)
        print(
            f"one epoch: plain {epoch_s['plain']:.1f} s, DO-Conv {epoch_s['doconv']:.1f} s; "
            f"expected total for {args.seeds} seeds x {args.epochs} epochs: {total / 60:.1f} min"
        )
        return 0
    started = time.perf_counter()
    results: list[SeedResult] = []
    for seed in range(args.seeds):
        result = run_seed(seed, data, settings)
        results.append(result)
        if seed == 0:
            epoch_s = {"plain": result.plain_epoch_s, "doconv": result.doconv_epoch_s}
            total = expected_total_s(epoch_s, args.epochs, args.seeds)
            print(
                f"  one epoch (median of seed 0): plain {result.plain_epoch_s:.1f} s, DO-Conv "
                f"{result.doconv_epoch_s:.1f} s; expected total {total / 60:.1f} min",
                flush=True,
            )
        print(
            f"  seed {seed}: plain {result.plain:.2f}%, DO-Conv {result.doconv:.2f}% "
            f"({result.gap:+.2f}), deployed changed {result.deployed_changed_labels} labels",
            flush=True,
        )
    seed_rows, summary_rows, record = tables(results)
    elapsed = time.perf_counter() - started
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/doconv_fashion.py" + "".join(f" {w}" for w in words)
    title = "DO-Conv demo (the paper's 3-conv network) on Fashion-MNIST"
    text = "\n".join(
        [
            f"## {title}",
            f"{setting_text}; {machine_line()}; total {elapsed / 60:.1f} min",
            f"command: `{command}`",
            "",
            markdown_table(SUMMARY_HEADERS, summary_rows),
            "",
            markdown_table(SEED_HEADERS, seed_rows),
        ]
    )
    print("\n" + text, flush=True)
    write_csv(args.out / "doconv_fashion.csv", SEED_HEADERS, seed_rows)
    write_json(
        args.out / "doconv_fashion.json",
        {
            "title": title,
            "setting": setting_text,
            "command": command,
            "machine": machine_summary(),
            "settings": asdict(settings),
            "summary": record,
            "seeds": [asdict(r) | {"gap": r.gap} for r in results],
            "elapsed_s": elapsed,
        },
    )
    plot = args.plot_dir / "doconv_fashion.png"
    plot_curves(results, plot, f"DO-Conv demo, Fashion-MNIST: {setting_text}")
    print(f"\nwrote {args.out}/doconv_fashion.csv, doconv_fashion.json and {plot}")
    return 0 if record["all_deployed_same_labels"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
