"""What a person sees while training: a tqdm bar on a terminal, plain lines otherwise.

Both show the epoch, loss, accuracy, learning rate, throughput (examples per second over all
processes) and the estimated time to the end of the run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Progress display for ``total`` iterations, starting at ``start`` (after a resume).

    ``mode``: ``"tqdm"``, ``"plain"`` (one line every ``every`` iterations), ``"none"`` or
    ``"auto"`` (tqdm when stderr is a terminal, else plain).
    """

    def __init__(self, total: int, start: int, mode: str, every: int, enabled: bool = True) -> None:
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self.total = total
        self.done = start
        self.every = max(1, every)
        self.examples = 0
        self.session_iters = 0
        self.started = time.perf_counter()
        self.bar: Any = None
        if self.mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def update(
        self, epoch: int, loss: float, acc: float, lr: float, examples: int, seconds: float
    ) -> None:
        self.done += 1
        self.session_iters += 1
        self.examples += examples
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        throughput = self.examples / elapsed
        if self.bar is not None:
            self.bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{loss:.4f}",
                acc=f"{acc:.3f}",
                lr=f"{lr:.3g}",
                ex_s=f"{throughput:.0f}",
                refresh=False,
            )
            self.bar.update(1)
        elif self.mode == "plain" and (self.done % self.every == 0 or self.done == self.total):
            eta = (self.total - self.done) * elapsed / self.session_iters
            print(
                f"iter {self.done}/{self.total} epoch {epoch + 1} loss {loss:.4f} acc {acc:.3f} "
                f"lr {lr:.4g} {throughput:.0f} ex/s eta {format_duration(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
