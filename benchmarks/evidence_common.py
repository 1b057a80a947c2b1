"""Helpers shared by the evidence scripts (``accuracy.py``, ``doconv_fashion.py``,
``bench_deploy_cpu.py``): the machine description, Fashion-MNIST as tensors, statistics over
seeds, and the markdown / CSV / JSON writers.

Nothing here trains or times anything; the scripts do.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import math
import os
import platform
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
#: Where the scripts write their PNG plots by default (``docs/img`` of the repository).
DEFAULT_PLOT_DIR = REPO / "docs" / "img"
#: Debian's ``dataset-fashion-mnist`` installs the idx files here.
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# the machine


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` states it (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_summary() -> dict[str, Any]:
    """What the numbers depend on, read at run time."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(extra: dict[str, Any] | None = None) -> str:
    """One line for a report header: date, CPU, cores, threads and versions."""
    info = machine_summary() | (extra or {})
    parts = [
        info.pop("date"),
        f"CPU {info.pop('cpu')} ({info.pop('logical_cores')} logical cores)",
        f"{info.pop('torch_threads')} torch threads",
        f"torch {info.pop('torch')}",
        f"Python {info.pop('python')}",
    ]
    parts += [f"{key} {value}" for key, value in info.items()]
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class ImageData:
    """A classification dataset held as normalised tensors ``(N, C, H, W)`` and labels ``(N,)``.

    ``background`` is the normalised value of a black pixel (what a zero-padded shift fills in).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    background: float


def _stack(dataset: Any) -> tuple[Tensor, Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.long)


def load_fashion_mnist(
    data_dir: str | Path = DEFAULT_FASHION_DIR,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> ImageData:
    """Fashion-MNIST through the training package's loader (idx files, its normalisation).

    ``train_subset`` / ``test_subset`` keep the first N examples of each split. Missing or
    malformed files raise the loader's ``DataError`` naming the path and the expected layout.
    """
    from dynaconv.train.config import DEFAULTS
    from dynaconv.train.data import build_datasets

    for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    data = copy.deepcopy(DEFAULTS["data"])
    data.update(
        dataset="fashion_mnist",
        dir=str(data_dir),
        augment=[],
        train_subset=train_subset,
        val_subset=test_subset,
    )
    train_set, test_set, info = build_datasets(data, seed=0)
    x_train, y_train = _stack(train_set)
    x_test, y_test = _stack(test_set)
    return ImageData(x_train, y_train, x_test, y_test, (0.0 - info.mean[0]) / info.std[0])


def random_shift(images: Tensor, pad: int, generator: torch.Generator, fill: float) -> Tensor:
    """Each image translated by its own random offset in ``[-pad, pad]`` on both axes.

    Equivalent to padding by ``pad`` with ``fill`` and cropping the original size at a random
    position (torchvision's ``RandomCrop(size, padding=pad)``), batched.
    """
    if pad == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (B, 1, W)
    picked = padded[torch.arange(batch)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# statistics


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"91.23 ± 0.17"`` (``"91.23"`` for one value), after multiplying by ``scale``."""
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------------------------
# writers


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; every row must have one cell per header."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells, expected {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text}")
    return value


def wrap_title(text: str, width: int = 100) -> str:
    """A plot title broken into lines of at most ``width`` characters (existing breaks kept)."""
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())
