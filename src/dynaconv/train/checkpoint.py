"""Checkpoints: atomic writes, safe loading, RNG state as tensors, safetensors weights.

A checkpoint is a ``torch.save`` of a dict that holds only tensors and primitive containers
(dict, list, tuple, str, int, float, bool, None), so it loads with ``weights_only=True``:
loading never unpickles code. Its keys:

* ``format``: ``"dynaconv-train-checkpoint"`` and ``version``;
* ``config``: the resolved configuration as YAML text;
* ``model``, ``ema`` (or None), ``optimizer``, ``scaler`` (or None): state dicts;
* ``state``: epoch, iteration, batches done in the epoch, best accuracy, history rows;
* ``rng``: torch CPU and CUDA generator states, numpy's and Python's, all as tensors.

Writes go to a temporary file ``.NAME.XXXX.tmp`` in the same folder, then ``os.replace``, so
a crash leaves the previous file intact (a killed process may leave the temporary file, which
the next run in that folder removes: :mod:`dynaconv.train.runfolder`).

Nothing here runs code from a file: checkpoints load with ``weights_only=True``, weights are
safetensors, and the configuration a file holds is YAML parsed with ``yaml.safe_load`` and then
validated (:func:`dynaconv.train.config.config_from_text`), whose names resolve only through
model registries. :func:`load_checkpoint` turns truncated, foreign or unreadable files, and
files that lack an entry the caller needs, into a :class:`CheckpointError` naming the file and
the entry; :func:`load_state` does the same for state dicts that do not fit a model.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "FORMAT",
    "RESUME_ENTRIES",
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng",
    "load_checkpoint",
    "load_state",
    "load_weights",
    "read_metadata",
    "restore_rng",
    "save_safetensors",
]

FORMAT = "dynaconv-train-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, foreign, wrong format)."""


#: Entries a checkpoint needs to resume training (``eval`` and friends need ``config``, ``model``).
RESUME_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "config": str,
    "model": dict,
    "ema": (dict, type(None)),
    "optimizer": dict,
    "scaler": (dict, type(None)),
    "state": dict,
    "rng": dict,
}
#: Entries of ``state`` and ``rng`` that resuming reads.
STATE_ENTRIES = ("epoch", "batches_done", "iteration", "best_acc", "history", "epoch_stats")
RNG_ENTRIES = (
    "torch",
    "python_version",
    "python_state",
    "python_gauss",
    "numpy_keys",
    "numpy_pos",
    "numpy_has_gauss",
    "numpy_gauss",
    "cuda",
)


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (0o666 less the process umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _file_mode())  # mkstemp's 0o600 would make the results private
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


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def check_file(path: Path, what: str) -> None:
    """:class:`CheckpointError` unless ``path`` is an existing, non-empty regular file."""
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, expected a file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty")


def load_checkpoint(
    path: str | Path, entries: Mapping[str, type | tuple[type, ...]] | None = None
) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``) or raise :class:`CheckpointError`.

    ``entries`` maps the keys the caller needs to their types (e.g. :data:`RESUME_ENTRIES`);
    a missing or mistyped entry is an error naming it.
    """
    path = Path(path)
    check_file(path, "checkpoint")
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
    for key, kind in (entries or {}).items():
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry")
        if not isinstance(payload[key], kind):
            raise CheckpointError(
                f"checkpoint {path}: entry {key!r} has the wrong type ({type(payload[key]).__name__})"
            )
    if entries is RESUME_ENTRIES:
        for group, names in (("state", STATE_ENTRIES), ("rng", RNG_ENTRIES)):
            missing = [name for name in names if name not in payload[group]]
            if missing:
                raise CheckpointError(f"checkpoint {path} has no {group}.{missing[0]} entry")
    return payload


def load_state(module: nn.Module, state: Any, origin: str) -> None:
    """``module.load_state_dict(state)`` (strict) or one :class:`CheckpointError` line.

    The message names ``origin`` (file and entry) and the first missing, unexpected or
    mis-shaped tensor, instead of PyTorch's multi-line report.
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{origin} is not a state dict of tensors")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problem = None
    if missing:
        problem = f"{len(missing)} tensor(s) missing, first {missing[0]!r}"
    elif unexpected:
        problem = f"{len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}"
    elif shapes:
        key = shapes[0]
        problem = (
            f"{key!r} has shape {tuple(state[key].shape)}, the model's is "
            f"{tuple(expected[key].shape)}"
        )
    if problem is None:
        try:
            module.load_state_dict(state)
        except (RuntimeError, ValueError, TypeError) as error:
            problem = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    if problem is not None:
        raise CheckpointError(
            f"{origin} does not fit the model of the configuration: {problem} "
            "(was it written with other model settings?)"
        )


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


T = TypeVar("T")


def _read_safetensors(path: str | Path, read: Callable[[Any], T]) -> T:
    """``read(handle)`` of the safetensors file at ``path``, or :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    check_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return read(handle)
    except Exception as error:
        raise CheckpointError(
            f"cannot read {path} as safetensors (truncated or not a safetensors file): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (its tensors are not read), or :class:`CheckpointError`."""
    return _read_safetensors(path, lambda handle: dict(handle.metadata() or {}))


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or :class:`CheckpointError`."""

    def read(handle: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
        metadata = handle.metadata() or {}
        return {key: handle.get_tensor(key) for key in handle.keys()}, metadata  # noqa: SIM118

    return _read_safetensors(path, read)


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
