"""The run folder's checkpoint set: ``last.pt``, ``best.pt`` and ``best.safetensors``.

:class:`CheckpointSet` writes them (each atomically, ``last.pt`` first: it is the source from
which a resume restores the others) and, after a resume, repairs the set so that ``best.pt``,
``best.safetensors`` and ``metrics.csv`` agree with the resumed checkpoint's history (see
:meth:`CheckpointSet.repair`). The file format is :mod:`.checkpoint`'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    read_metadata,
    save_safetensors,
)
from .errors import NonFiniteLossError
from .runlog import history_csv

__all__ = ["CheckpointSet", "checkpoint_iteration", "weights_iteration"]


def checkpoint_iteration(path: Path) -> int | None:
    """``state["iteration"]`` of the checkpoint at ``path``; None when absent or unreadable."""
    try:
        return int(load_checkpoint(path, {"state": dict})["state"]["iteration"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def weights_iteration(path: Path) -> str | None:
    """The ``iteration`` metadata of a safetensors file; None when absent or unreadable."""
    try:
        return read_metadata(path).get("iteration")
    except CheckpointError:
        return None


class CheckpointSet:
    """The checkpoints of the run folder ``out``; ``input_shape`` (C, H, W) goes into the
    weights files' metadata."""

    def __init__(self, out: Path, input_shape: list[int]) -> None:
        self.out = out
        self.input_shape = input_shape

    def weights_metadata(self, config_text: str, iteration: int) -> dict[str, str]:
        """The metadata of a weights file: what ``eval`` and ``deploy`` rebuild it from."""
        return {
            "format": "dynaconv-train-weights",
            "config": config_text,
            "input_shape": json.dumps(self.input_shape),
            "iteration": str(iteration),
        }

    def write_last(self, payload: dict[str, Any]) -> None:
        """``last.pt``: written first, the source from which a resume restores the others."""
        atomic_save(payload, self.out / "last.pt")

    def write_best(self, payload: dict[str, Any]) -> None:
        """``best.pt`` and ``best.safetensors`` (after :meth:`write_last`)."""
        atomic_save(payload, self.out / "best.pt")
        self.write_best_weights(payload)

    def write_best_weights(self, payload: dict[str, Any]) -> None:
        """``best.safetensors``: the evaluation weights of the checkpoint ``payload``."""
        weights = payload["ema"] if payload["ema"] is not None else payload["model"]
        bad = next(
            (k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()),
            None,
        )
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} of the checkpoint of iteration {payload['state']['iteration']} is NaN "
                "or infinite; best.safetensors is not written from it"
            )
        metadata = self.weights_metadata(payload["config"], payload["state"]["iteration"])
        save_safetensors(weights, self.out / "best.safetensors", metadata)

    def repair(self, state: dict[str, Any], resumed_from: Path) -> list[str]:
        """Restore the end-of-epoch set from the resumed checkpoint; what was restored.

        ``best.pt`` must be the checkpoint of ``state["best_iteration"]``: a stale or missing
        one is copied from the resumed checkpoint when that is the best epoch's, or from the
        ``best.pt`` beside it. ``best.safetensors`` must carry that iteration in its metadata,
        else it is rebuilt from ``best.pt``; ``metrics.csv`` is rebuilt from the history rows.
        """
        restored = []
        wanted = state["best_iteration"]
        best_path = self.out / "best.pt"
        if wanted is not None and checkpoint_iteration(best_path) != wanted:
            sources = [resumed_from, resumed_from.parent / "best.pt"]
            source = next((p for p in sources if checkpoint_iteration(p) == wanted), None)
            if source is None:
                print(
                    f"warning: best.pt of iteration {wanted} is neither in {self.out} nor beside "
                    f"{resumed_from}; best.pt is written again when an epoch beats "
                    f"{state['best_acc']:.4f}",
                    file=sys.stderr,
                )
            else:
                atomic_write_bytes(source.read_bytes(), best_path)
                restored.append(f"best.pt (from {source.name})")
        best_weights = self.out / "best.safetensors"
        if (
            wanted is not None
            and checkpoint_iteration(best_path) == wanted
            and weights_iteration(best_weights) != str(wanted)
        ):
            self.write_best_weights(load_checkpoint(best_path))
            restored.append("best.safetensors (from best.pt)")
        metrics = self.out / "metrics.csv"
        if state["history"]:
            text = history_csv(state["history"])
            if not metrics.is_file() or metrics.read_bytes() != text.encode():
                atomic_write_text(text, metrics)
                restored.append("metrics.csv (from the history rows)")
        elif metrics.exists():
            metrics.unlink()
            restored.append("metrics.csv (removed: no epoch done)")
        return restored
