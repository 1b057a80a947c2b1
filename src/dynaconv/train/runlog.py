"""The run's logs: ``metrics.csv`` (one row per epoch) and TensorBoard scalars.

Only the main process writes (``enabled``). ``metrics.csv`` is rewritten whole, atomically,
at the end of every epoch from the history rows, so it always matches the checkpoint set;
TensorBoard gets ``train/loss`` and ``train/lr`` every logging interval and ``epoch/*`` (every
non-null value of a history row) at the end of every epoch. A resumed run purges the
TensorBoard events written after its checkpoint's iteration.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

__all__ = ["RunLog", "history_csv"]


def history_csv(rows: list[dict[str, Any]]) -> str:
    """The history rows as CSV text (a header from the first row's keys)."""
    handle = io.StringIO(newline="")
    table = csv.DictWriter(handle, fieldnames=list(rows[0]))
    table.writeheader()
    table.writerows(rows)
    return handle.getvalue()


class RunLog:
    """Writes the logs of the run folder ``out`` (see the module docstring)."""

    def __init__(self, out: Path, *, tensorboard: bool, enabled: bool = True) -> None:
        self.out = out
        self.tensorboard = tensorboard and enabled
        self.enabled = enabled
        self.writer: Any = None

    def open(self, iteration: int) -> None:
        """Start the TensorBoard writer at ``iteration`` (events after it are purged)."""
        if not self.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=iteration or None)

    def train_step(self, iteration: int, loss: float, lr: float) -> None:
        """The training loss and learning rate at ``iteration``."""
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, iteration)
            self.writer.add_scalar("train/lr", lr, iteration)

    def end_epoch(self, history: list[dict[str, Any]]) -> None:
        """``metrics.csv`` from all rows; the last row's values as ``epoch/*`` scalars."""
        if not self.enabled:
            return
        atomic_write_text(history_csv(history), self.out / "metrics.csv")
        if self.writer is not None:
            row = history[-1]
            for key, value in row.items():
                if key not in ("epoch", "iteration") and value is not None:
                    self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
