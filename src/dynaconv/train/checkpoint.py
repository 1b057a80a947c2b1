"""Checkpoints: atomic writes, safe loading, RNG state as tensors, safetensors weights.

A checkpoint is a ``torch.save`` of a dict that holds only tensors and primitive containers
(dict, list, tuple, str, int, float, bool, None), so it loads with ``weights_only=True``:
loading never unpickles code. Its keys:

* ``format``: ``"dynaconv-train-checkpoint"`` and ``version``;
* ``config``: the resolved configuration as YAML text;
* ``model``, ``ema`` (or None), ``optimizer``, ``scaler`` (or None): state dicts;
* ``state``: epoch, iteration, batches done in the epoch, best accuracy, history rows;
* ``rng``: torch CPU and CUDA generator states, numpy's and Python's, all as tensors;
* ``digests``: the SHA-256 of every tensor above (dtype, shape and bytes), keyed by its path
  in the payload (``model/conv.weight``, ``optimizer/state/0/momentum_buffer``).

**Integrity**: :func:`load_checkpoint` recomputes every digest and refuses a file whose
tensors were changed, added or removed (a :class:`CheckpointError` naming the file and the
first such tensor). Safetensors files written by training and ``deploy`` carry the same
digests in their metadata (``digests``, JSON), checked by :func:`load_weights`. Version-1
checkpoints (written before digests) load without the check. A digest detects corruption and
edits made without this module; it is not a signature (whoever can write the file can
recompute it), and nothing in a file runs code either way.

Writes go to a temporary file ``.NAME.XXXX.tmp`` in the same folder, then ``os.replace``, so
a crash leaves the previous file intact (a killed process may leave the temporary file, which
the next run in that folder removes: :mod:`dynaconv.train.runfolder`).

Nothing here runs code from a file: checkpoints load with ``weights_only=True``, weights are
safetensors, and the configuration a file holds is YAML parsed within bounds
(:func:`dynaconv.train.config.parse_yaml`) and then validated (:func:`dynaconv.train.config.config_from_text`), whose names resolve only through
model registries. :func:`load_checkpoint` turns truncated, foreign or unreadable files, and
files that lack an entry the caller needs, into a :class:`CheckpointError` naming the file and
the entry; :func:`load_state` does the same for state dicts that do not fit a model.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    "atomic_write_file",
    "atomic_write_text",
    "capture_rng",
    "json_text",
    "load_checkpoint",
    "load_state",
    "load_weights",
    "payload_digests",
    "read_metadata",
    "restore_rng",
    "save_safetensors",
    "tensor_digest",
]

FORMAT = "dynaconv-train-checkpoint"
VERSION = 2
#: Versions :func:`load_checkpoint` reads (1: before tensor digests).
READABLE_VERSIONS = (1, 2)


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
    try:
        write(tmp)
        # mkstemp's 0o600 (kept by writers that replace the file) would make results private
        os.chmod(tmp, _file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes."""
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    if data.numel():
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tensors(node: Any, prefix: str = "") -> Any:
    """``(path, tensor)`` of every tensor in nested dicts, lists and tuples."""
    if isinstance(node, Tensor):
        yield prefix, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _tensors(value, f"{prefix}/{index}")


def payload_digests(payload: Mapping[str, Any]) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor of a checkpoint payload (``digests`` aside)."""
    return {
        path: tensor_digest(tensor)
        for path, tensor in _tensors({k: v for k, v in payload.items() if k != "digests"})
    }


def _check_digests(stored: Any, actual: Mapping[str, str], origin: str) -> None:
    """:class:`CheckpointError` naming ``origin`` unless ``stored`` equals ``actual``."""
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{origin} has no tensor digests (the file was changed)")
    for name, digest in actual.items():
        if stored.get(name) != digest:
            why = "has no stored digest" if name not in stored else "does not match its digest"
            raise CheckpointError(
                f"{origin}: tensor {name} {why}; the file was changed or corrupted after it "
                "was written"
            )
    missing = [name for name in stored if name not in actual]
    if missing:
        raise CheckpointError(
            f"{origin}: tensor {missing[0]} is missing; the file was changed or corrupted"
        )


def json_text(value: Any) -> str:
    """``value`` as indented JSON, non-finite floats as ``null`` (JSON has no NaN)."""

    def finite(node: Any) -> Any:
        if isinstance(node, float) and not math.isfinite(node):
            return None
        if isinstance(node, dict):
            return {key: finite(item) for key, item in node.items()}
        if isinstance(node, list | tuple):
            return [finite(item) for item in node]
        return node

    return json.dumps(finite(value), indent=2, allow_nan=False)


def atomic_write_file(path: str | Path, write: Callable[[str], Any]) -> None:
    """``write(temporary_path)``, then ``os.replace`` onto ``path`` (for writers that take a
    path, e.g. ``torch.export.save``, ``torch.onnx.export``)."""
    _atomic_write(Path(path), write)


def atomic_save(payload: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file and ``os.replace``; a
    training checkpoint (``format`` :data:`FORMAT`) gets the digests of its tensors."""
    payload = dict(payload)
    if payload.get("format") == FORMAT:
        payload["version"] = VERSION
        payload["digests"] = payload_digests(payload)
    _atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


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
    if payload.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint version {short_version(payload.get('version'))}, "
            f"expected one of {READABLE_VERSIONS}"
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
    if payload["version"] >= 2:
        _check_digests(payload.get("digests"), payload_digests(payload), f"checkpoint {path}")
    return payload


def short_version(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    """Weights only, as safetensors (shared storage is cloned apart), written atomically, with
    the digest of every tensor in the metadata (``digests``)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = dict(metadata or {})
    metadata["digests"] = json.dumps({k: tensor_digest(v) for k, v in tensors.items()})
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
    """Tensors and metadata of a safetensors file, or :class:`CheckpointError` (also when its
    ``digests`` metadata, when present, does not match the tensors)."""

    def read(handle: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
        metadata = handle.metadata() or {}
        return {key: handle.get_tensor(key) for key in handle.keys()}, metadata  # noqa: SIM118

    tensors, metadata = _read_safetensors(path, read)
    if "digests" in metadata:
        try:
            stored = json.loads(metadata["digests"])
        except ValueError:
            stored = None
        actual = {key: tensor_digest(value) for key, value in tensors.items()}
        _check_digests(stored, actual, str(path))
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
