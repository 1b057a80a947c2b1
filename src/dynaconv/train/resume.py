"""Resuming a run from a checkpoint: what is checked before anything is built
(:func:`read_resume`), what is restored into the built objects (:func:`restore_objects`) and
how the training state continues (:func:`resumed_state`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import RESUME_ENTRIES, CheckpointError, load_checkpoint, load_state, restore_rng
from .config import config_from_text
from .errors import ConfigError

__all__ = ["best_iteration", "read_resume", "restore_objects", "resumed_state", "score"]


def score(row: dict[str, Any]) -> float | None:
    """The accuracy that ranks an epoch for ``best.pt`` (EMA's when present); None: not evaluated."""
    return row["ema_val_acc"] if row.get("ema_val_acc") is not None else row.get("val_acc")


def best_iteration(state: dict[str, Any]) -> int | None:
    """The iteration of the first history row that reached ``best_acc`` (older checkpoints)."""
    for row in state["history"]:
        if score(row) is not None and score(row) >= state["best_acc"]:
            return row["iteration"]
    return None


def read_resume(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to resume, checked for every entry resuming needs and against the run's
    ``config`` (the same optimizer; an EMA state when the run has an EMA)."""
    payload = load_checkpoint(path, RESUME_ENTRIES)
    stored = config_from_text(payload["config"], f"checkpoint {path}")
    if stored["optim"]["name"] != config["optim"]["name"]:
        raise ConfigError(
            f"optim.name is {config['optim']['name']!r} but checkpoint {path} was "
            f"written with {stored['optim']['name']!r}; its optimizer state cannot resume"
        )
    if payload["ema"] is None and config["train"]["ema_decay"] > 0:
        raise ConfigError(f"train.ema_decay is set but checkpoint {path} has no EMA state")
    return payload


def restore_objects(
    path: Path,
    payload: dict[str, Any],
    *,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rank: int,
) -> None:
    """Load the checkpoint's weights, optimizer and scaler states and random states (this
    process's ``rank``'s torch generator) into the built objects."""
    load_state(model, payload["model"], f"checkpoint {path} (model)")
    if ema is not None:
        load_state(ema, payload["ema"], f"checkpoint {path} (ema)")
    try:
        optimizer.load_state_dict(payload["optimizer"])
        if payload["scaler"] is not None and scaler.is_enabled():
            scaler.load_state_dict(payload["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path}: the optimizer state does not fit this model and "
            f"optimizer ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None
    rng = payload["rng"]
    restore_rng(rng)
    per_rank = rng.get("torch_per_rank") or []
    if rank < len(per_rank):
        torch.set_rng_state(per_rank[rank])


def resumed_state(
    initial: dict[str, Any],
    path: Path,
    payload: dict[str, Any],
    *,
    world: int,
    total_iters: int,
    warn: bool,
) -> dict[str, Any]:
    """The training state to continue with: ``initial`` updated by the checkpoint's, for
    ``world`` processes and a run of ``total_iters`` iterations (``warn``: print a warning
    when either differs from the checkpoint's run)."""
    state = {**initial, **payload["state"]}
    if state["best_iteration"] is None:  # written before best_iteration was kept
        state["best_iteration"] = best_iteration(state)
    if state["world_size"] != world and warn:
        print(
            f"warning: {path} was written by {state['world_size']} processes, resuming "
            f"with {world}: the data order of the interrupted epoch changes",
            file=sys.stderr,
        )
    state["world_size"] = world
    stored_total = state.get("total_iters")
    if stored_total is not None and stored_total != total_iters and warn:
        print(
            f"warning: {path} was written by a run of {stored_total} iterations, this one "
            f"has {total_iters} (train.epochs / train.max_iters): the learning rate "
            f"and layer schedules continue from iteration {state['iteration']} of "
            f"{total_iters}",
            file=sys.stderr,
        )
    state["total_iters"] = total_iters
    return state
