"""Checkpoints: atomic writes, safe loading, RNG state as tensors, safetensors weights.

A checkpoint is a ``torch.save`` of a dict that holds only tensors and primitive containers
(dict, list, tuple, str, int, float, bool, None), so it loads with ``weights_only=True``:
loading never unpickles code. Its keys:

* ``format``: ``"dynaconv-train-checkpoint"`` and ``version``;
* ``config``: the resolved configuration as YAML text;
* ``model``, ``ema`` (or None), ``optimizer``, ``scaler`` (or None): state dicts;
* ``state``: epoch, iteration, batches done in the epoch, best accuracy, history rows;
* ``rng``: torch CPU and CUDA generator states, numpy's and Python's, all as tensors.

Writes go to a temporary file in the same folder, then ``os.replace``, so a crash leaves the
previous file intact. :func:`load_checkpoint` turns truncated, foreign or unreadable files into
a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_save",
    "capture_rng",
    "load_checkpoint",
    "load_weights",
    "restore_rng",
    "save_safetensors",
]

FORMAT = "dynaconv-train-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, foreign, wrong format)."""


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(payload: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write(Path(path), lambda tmp: torch.save(dict(payload), tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``) or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
            f"torch.save file holding only tensors ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dynaconv training checkpoint (no format={FORMAT!r} marker); "
            "for plain weights use a .safetensors file"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}, expected {VERSION}"
        )
    return payload


# --------------------------------------------------------------------------------------------
# RNG state as tensors


def capture_rng() -> dict[str, Any]:
    """Every random generator's state, as tensors and ints (safe for ``weights_only``)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    internal = tuple(int(v) for v in state["python_state"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# safetensors


def save_safetensors(
    state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Weights only, as safetensors (shared storage is cloned apart), written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:
        raise CheckpointError(
            f"cannot read {path} as safetensors (truncated or not a safetensors file): {error}"
        ) from None
    return tensors, metadata


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``model`` (unwrapping DDP and torch.compile), detached on CPU."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model
