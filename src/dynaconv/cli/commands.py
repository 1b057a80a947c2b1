"""eval, deploy, profile and export on a trained model.

A *trained model* is any of

* a training checkpoint ``last.pt`` / ``best.pt`` (the EMA weights when the run had an EMA,
  unless ``weights="model"``);
* a weights file ``*.safetensors`` written by training (its metadata holds the configuration);
* for ``eval`` only, a folder written by ``deploy``.

``deploy`` writes a folder that rebuilds the static model without any pickled code:
``config.yaml``, ``weights.safetensors`` (the trained weights), ``deployed.safetensors`` (the
deployed weights) and ``deployed.pt2`` (``torch.export``, for other runtimes); :func:`load_deployed`
rebuilds it from the first three (build from the configuration, load the trained weights,
``deploy``, load and compare the deployed weights).

**No file runs code.** Every configuration read from a file is validated, and its model name
resolves only through model registries (:mod:`dynaconv.train.names`); tensors come from
``weights_only`` checkpoints or safetensors. ``torch.export.load`` unpickles, so a ``.pt2`` is
loaded only when asked explicitly (``evaluate_checkpoint(..., unsafe_load_pt2=True)``, the
command line's ``--unsafe-load-pt2``), never by default; ``deploy`` and ``export`` reload only
the ``.pt2`` they have just written, to check it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dynaconv
from dynaconv.lifecycle import DeployVerificationError, verify_outputs
from dynaconv.train.checkpoint import (
    CheckpointError,
    atomic_write_file,
    atomic_write_text,
    check_file,
    json_text,
    load_checkpoint,
    load_state,
    load_weights,
    save_safetensors,
)
from dynaconv.train.config import (
    ConfigError,
    config_from_text,
    dump_config,
    read_config_file,
    set_path,
    validate_config,
)
from dynaconv.train.data import build_datasets, dataset_info
from dynaconv.train.extras import require_extras
from dynaconv.train.factory import build_model
from dynaconv.train.runfolder import make_writable_folder

__all__ = [
    "ExportError",
    "deploy_checkpoint",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_deployed",
    "load_trained",
    "profile_checkpoint",
    "run_pte",
    "write_pte",
]

#: What a checkpoint must hold to rebuild its model.
MODEL_ENTRIES: dict[str, Any] = {"config": str, "model": dict, "ema": (dict, type(None))}


def _apply(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A configuration read from a file, with the command line's ``overrides``: a file never
    decides to download (``data.download`` is false unless an override sets it)."""
    config["data"]["download"] = False
    for dotted, value in overrides.items():
        set_path(config, dotted, value)
    validate_config(config)
    return config


def _check_trained_path(path: Path) -> None:
    """A trained-model file: not a folder, not a ``.pt2``, present and non-empty."""
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; give a checkpoint (last.pt / best.pt) or a .safetensors "
            "written by training (eval also takes a deploy folder)"
        )
    if path.suffix == ".pt2":
        raise CheckpointError(
            f"{path} is a torch.export program, not a trained model; give last.pt / best.pt "
            "or a .safetensors written by training"
        )
    check_file(path, "checkpoint" if path.suffix != ".safetensors" else "weights file")


def load_trained(
    path: str | Path, weights: str = "ema", overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint or weights file (eval mode, CPU) and its configuration."""
    path = Path(path)
    _check_trained_path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = load_weights(path)
        if metadata.get("format") != "dynaconv-train-weights" or "config" not in metadata:
            raise CheckpointError(
                f"{path} has no training configuration in its metadata; it was not written by "
                "dynaconv train (use a last.pt/best.pt checkpoint or model.safetensors)"
            )
        config = config_from_text(metadata["config"], f"{path} (metadata)")
        state, origin = tensors, str(path)
    else:
        payload = load_checkpoint(path, MODEL_ENTRIES)
        config = config_from_text(payload["config"], f"checkpoint {path}")
        use_ema = weights == "ema" and payload["ema"] is not None
        state = payload["ema"] if use_ema else payload["model"]
        origin = f"checkpoint {path} ({'ema' if use_ema else 'model'})"
    config = _apply(config, overrides or {})
    model = build_model(config)
    load_state(model, state, origin)
    return model.eval(), config


def _val_loader(config: dict[str, Any]) -> DataLoader:
    _, val_set, _ = build_datasets(config["data"], config["train"]["seed"])
    return DataLoader(val_set, batch_size=config["data"]["eval_batch_size"], shuffle=False)


@torch.no_grad()
def evaluate(model: Any, loader: DataLoader, device: torch.device) -> dict[str, float]:
    loss_sum = correct = count = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += float((logits.argmax(1) == labels).sum())
        count += len(labels)
    return {"loss": loss_sum / count, "accuracy": correct / count, "examples": int(count)}


def _device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _folder_config(folder: Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The validated ``config.yaml`` of a deploy folder (with ``overrides``)."""
    if not folder.is_dir():
        raise CheckpointError(f"deploy folder {folder} does not exist")
    path = folder / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a deploy folder: it has no config.yaml (give a checkpoint, a "
            "training .safetensors or a folder written by dynaconv deploy)"
        )
    text = read_config_file(path, "configuration")
    return _apply(config_from_text(text, str(path)), overrides or {})


def evaluate_checkpoint(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    weights: str = "ema",
    device: str = "auto",
    unsafe_load_pt2: bool = False,
) -> dict[str, float]:
    """Validation loss and accuracy of a trained model or of a ``deploy`` folder.

    A deploy folder is rebuilt from its configuration and safetensors (:func:`load_deployed`).
    ``unsafe_load_pt2``: evaluate a ``.pt2`` (given, or the folder's ``deployed.pt2``) through
    ``torch.export.load``, which unpickles and so may run code: only for files you trust.
    """
    path = Path(path)
    target = _device(device)
    if unsafe_load_pt2:
        program_path = path / "deployed.pt2" if path.is_dir() else path
        if program_path.suffix != ".pt2":
            raise CheckpointError(
                f"--unsafe-load-pt2 loads a .pt2 file or a deploy folder's deployed.pt2, got {path}"
            )
        config = _folder_config(program_path.parent, overrides)
        check_file(program_path, "program")
        try:
            model: Any = torch.export.load(str(program_path)).module().to(target)
        except Exception as error:
            raise CheckpointError(
                f"cannot load {program_path} with torch.export: {error}"
            ) from None
    elif path.suffix == ".pt2":
        raise CheckpointError(
            f"{path}: loading a .pt2 unpickles it, which can run code; evaluate its deploy "
            "folder instead (rebuilt from config.yaml and safetensors), or pass "
            "--unsafe-load-pt2 if you trust the file"
        )
    elif path.is_dir():
        if (path / "best.pt").is_file() and not (path / "weights.safetensors").exists():
            raise CheckpointError(
                f"{path} is a run folder, not a deploy folder: evaluate {path / 'best.pt'} "
                "(or last.pt, model.safetensors)"
            )
        config = _folder_config(path, overrides)
        model = load_deployed(path, config).to(target)
    else:
        model, config = load_trained(path, weights, overrides)
        model = model.to(target)
    return evaluate(model, _val_loader(config), target)


def _example_batch(config: dict[str, Any], batch: int) -> Tensor:
    """A real validation batch when the data is at hand, else a seeded random one."""
    try:
        _, val_set, _ = build_datasets(config["data"], config["train"]["seed"])
        return torch.stack([val_set[i][0] for i in range(min(batch, len(val_set)))])
    except Exception:
        info = dataset_info(config["data"])
        generator = torch.Generator().manual_seed(0)
        shape = (batch, info.channels, info.image_size, info.image_size)
        return torch.randn(shape, generator=generator)


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 16)


#: The files ``deploy`` and ``export`` write into their ``--out`` folder.
DEPLOY_FILES = ("config.yaml", "weights.safetensors", "deployed.safetensors", "deployed.pt2")
EXPORT_FILES = {
    fmt: ("model.pt2", f"model.{fmt}", "config.yaml", "export.json") for fmt in ("onnx", "pte")
}


def prepare_output_folder(
    out: str | Path, files: tuple[str, ...] = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """Create ``out`` (a writable folder) before any work, or :class:`ConfigError` naming it.

    Nothing is written through a symbolic link: ``out`` and any of its ``files`` that is a
    link is refused. An existing file of ``files`` is refused unless ``overwrite``; the files
    are then replaced atomically (temporary file, then ``os.replace``).
    """
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(
            f"{flag} {out} is a symbolic link; outputs are never written through links"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a folder")
    for name in files:
        target = out / name
        if target.is_symlink():
            raise ConfigError(
                f"{target} is a symbolic link; outputs are never written through links "
                "(remove it or choose another --out)"
            )
        if target.exists() and not overwrite:
            raise ConfigError(f"{target} already exists; pass --overwrite to replace it")
    try:
        make_writable_folder(out)
    except OSError as error:
        raise ConfigError(
            f"{flag} {out} cannot be created or written: {error.strerror or error}"
        ) from None
    return out


def deploy_checkpoint(
    path: str | Path,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    weights: str = "ema",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Deploy, verify (on a validation batch), and write the static model folder
    (:data:`DEPLOY_FILES`, each atomically; existing ones only with ``overwrite``)."""
    model, config = load_trained(path, weights, overrides)
    out = prepare_output_folder(out, DEPLOY_FILES, overwrite)
    example = _example_batch(config, 8)
    deployed = dynaconv.deploy(model, example_input=example)
    with torch.no_grad():
        expected = model(example)
        actual = deployed(example)
    error = verify_outputs(expected, actual, "deployed model")
    meta = {"format": "dynaconv-train-weights", "config": dump_config(config)}
    save_safetensors(model.state_dict(), out / "weights.safetensors", meta)
    save_safetensors(deployed.state_dict(), out / "deployed.safetensors", {**meta, "deployed": "1"})
    program = torch.export.export(deployed, (example,), dynamic_shapes=({0: _batch_dim()},))
    atomic_write_file(out / "deployed.pt2", lambda tmp: torch.export.save(program, tmp))
    atomic_write_text(dump_config(config), out / "config.yaml")  # last: marks a whole folder
    reloaded = torch.export.load(str(out / "deployed.pt2")).module()  # the file just written
    with torch.no_grad():
        export_error = verify_outputs(expected, reloaded(example), "exported deployed model")
    rebuilt_error = verify_outputs(expected, load_deployed(out)(example), "rebuilt deployed model")
    return {
        "out_dir": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "params_deployed": sum(p.numel() for p in deployed.parameters()),
        "max_rel_error": error,
        "max_rel_error_pt2": export_error,
        "max_rel_error_rebuilt": rebuilt_error,
    }


def load_deployed(folder: str | Path, config: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the deployed model of a ``deploy`` folder (no pickled code involved).

    ``config``: the folder's configuration when already read (else its ``config.yaml``).
    """
    folder = Path(folder)
    config = config if config is not None else _folder_config(folder, None)
    model = build_model(config)
    trained, _ = load_weights(folder / "weights.safetensors")
    load_state(model, trained, f"{folder / 'weights.safetensors'}")
    deployed = dynaconv.deploy(model.eval(), verify=False)
    tensors, _ = load_weights(folder / "deployed.safetensors")
    state = deployed.state_dict()
    if set(state) != set(tensors) or any(state[k].shape != tensors[k].shape for k in state):
        raise CheckpointError(
            f"{folder}/deployed.safetensors does not match the rebuilt model (its tensors or "
            "shapes differ: a folder deployed by another version of dynaconv, whose deployed "
            "layout differs, or an edited file); deploy the trained weights again"
        )
    for key, value in tensors.items():
        if not torch.equal(state[key].cpu(), value):
            raise DeployVerificationError(
                f"rebuilt deployed model differs from {folder}/deployed.safetensors at {key}"
            )
    return deployed.eval()


def profile_checkpoint(
    path: str | Path | None,
    config: dict[str, Any] | None,
    batch: int = 1,
    convention: str = "dense",
    weights: str = "ema",
    progress: float | None = None,
    overrides: dict[str, Any] | None = None,
) -> dynaconv.Profile:
    """``dynaconv.profile`` of a trained model, or of a configured (untrained) one.

    ``progress`` first brings the schedules there (e.g. 1.0: an untrained CondenseNet
    condensed as at the end of training, so ``macs_active`` is what deployment will compute).
    """
    if batch < 1:
        raise ConfigError(f"--batch must be a positive integer, got {batch}")
    if path is not None:
        model, config = load_trained(path, weights, overrides)
    else:
        if config is None:
            raise ValueError("profile needs a checkpoint or a configuration (--recipe/--model)")
        model = build_model(config)
    if progress is not None:
        dynaconv.set_progress(model, progress)
    info = dataset_info(config["data"])
    shape = (batch, info.channels, info.image_size, info.image_size)
    return dynaconv.profile(model.eval(), shape, convention=convention)  # type: ignore[arg-type]


class ExportError(RuntimeError):
    """The ONNX exporter failed, or wrote a file that onnxruntime cannot load or run."""


def check_export_options(format: str, nchwc: bool) -> None:
    """``ConfigError`` for an export format or a combination of options that cannot work
    (checked before the optional dependencies, so the message names the option at fault)."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if nchwc and format != "onnx":
        raise ConfigError("--onnxruntime-nchwc rewrites an ONNX file: use it with --format onnx")


def export_checkpoint(
    path: str | Path,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    weights: str = "ema",
    deploy: bool = True,
    opset: int = 18,
    overwrite: bool = False,
    fixed_batch: int | None = None,
    format: str = "onnx",
    nchwc: bool = False,
) -> dict[str, Any]:
    """Write ``model.pt2`` (torch.export) and ``model.onnx``; check both against PyTorch.

    By default both have a dynamic batch dimension; onnxruntime must load the ONNX model and
    run it on a batch of a size other than the one exported, and match PyTorch to 1e-4
    (relative to the largest logit). ``fixed_batch=N`` exports for batches of exactly ``N``
    (the edge case, ``N = 1``): layers whose best graph depends on the batch size use it (a
    CondConv kxk layer becomes the kernel mixing and one convolution, see
    :func:`dynaconv.layers.condconv.functional.fixed_batch_graph`); the check runs another batch of
    ``N``.

    ``nchwc=True`` (ONNX only): also ``model.nchwc.onnx``, ``model.onnx`` with every conv
    whose kernel is computed (CondConv exported for a fixed batch; deployed DGC at a static
    batch of 1, exported again with each head's kept channels padded to whole blocks:
    :class:`~dynaconv.layers.dgc.deployed.nchwc_export`) on onnxruntime's blocked kernels
    (:mod:`dynaconv.onnxruntime_nchwc`): for onnxruntime on x86 processors with this
    machine's block size only; checked in onnxruntime like ``model.onnx``.

    ``format="pte"``: ``model.pte`` (an ExecuTorch program, convolutions and matrix products
    delegated to XNNPACK: the mobile CPU runtime, :func:`write_pte`) instead of
    ``model.onnx``, for a fixed batch (``fixed_batch``, default 1), loaded and run in
    ExecuTorch's runtime and checked the same way. It needs the ``edge`` extra; ``"onnx"``
    the ``export`` extra (:class:`~dynaconv.train.extras.MissingExtraError` otherwise, before
    any file is written).

    The model files are written into a temporary folder inside ``out`` and moved there only
    once every check passes: a failed export leaves no file that looks good.
    Raises :class:`ExportError` when the exporter fails or the runtime cannot load or run the
    file, :class:`~dynaconv.DeployVerificationError` when an output differs.
    The exporter's progress messages go to stderr, not stdout.
    """
    check_export_options(format, nchwc)
    # before any file is written
    require_extras(FORMAT_EXTRAS[format], what=f"exporting to {format}")
    if not MIN_OPSET <= opset <= _max_opset():
        raise ConfigError(f"--opset must be in [{MIN_OPSET}, {_max_opset()}], got {opset}")
    if format == "pte":
        fixed_batch = 1 if fixed_batch is None else fixed_batch
    if fixed_batch is not None and (
        isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or fixed_batch < 1
    ):
        raise ConfigError(f"--batch must be a positive integer, got {fixed_batch!r}")
    model, config = load_trained(path, weights, overrides)
    files = EXPORT_FILES[format] + ((NCHWC_FILE,) if nchwc else ())
    out = prepare_output_folder(out, files, overwrite)
    if deploy:
        model = dynaconv.deploy(model, example_input=_example_batch(config, 4))
    example, check, dynamic_shapes = _export_batches(config, fixed_batch)
    with torch.no_grad():
        expected = model(check)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as folder:
        staging = Path(folder)
        pt2_path = staging / "model.pt2"
        pt2_error = _export_pt2(model, example, check, expected, pt2_path, dynamic_shapes)
        if format == "pte":
            model_path = staging / "model.pte"
            runtime_error = verify_outputs(
                expected, _lower_and_run_pte(model, example, model_path, check), _PTE_CHECK
            )
        else:
            model_path = staging / "model.onnx"
            _export_onnx(model, example, model_path, opset, dynamic_shapes)
            runtime_error = verify_outputs(
                expected, torch.from_numpy(_run_onnx(model_path, check)), _ONNX_CHECK
            )
        staged_files = [pt2_path, model_path]
        if nchwc:
            from ..onnxruntime_nchwc import write_nchwc

            staged_files.append(staging / NCHWC_FILE)
            nchwc_convs = write_nchwc(
                _nchwc_source(model, example, model_path, opset, dynamic_shapes),
                staged_files[-1],
            )
            nchwc_error = verify_outputs(
                expected, torch.from_numpy(_run_onnx(staged_files[-1], check)), NCHWC_FILE
            )
        for staged in staged_files:
            os.replace(staged, out / staged.name)
    atomic_write_text(dump_config(config), out / "config.yaml")
    summary: dict[str, Any] = {"pt2": str(out / "model.pt2"), format: str(out / model_path.name)}
    summary.update(
        deployed=deploy,
        batch="dynamic" if fixed_batch is None else fixed_batch,
        max_rel_error_pt2=pt2_error,
    )
    summary[RUNTIME_ERROR_KEY[format]] = runtime_error
    if nchwc:
        summary.update(
            nchwc=str(out / NCHWC_FILE),
            nchwc_convs=nchwc_convs,
            max_rel_error_onnxruntime_nchwc=nchwc_error,
        )
    atomic_write_text(json_text(summary), out / "export.json")
    return summary


#: The formats ``export`` writes besides ``model.pt2``, and the extra each needs.
EXPORT_FORMATS = ("onnx", "pte")
FORMAT_EXTRAS = {"onnx": "export", "pte": "edge"}
#: The summary's key of the runtime check's error, per format.
RUNTIME_ERROR_KEY = {"onnx": "max_rel_error_onnxruntime", "pte": "max_rel_error_executorch"}
_ONNX_CHECK = "ONNX model (onnxruntime)"
#: ``model.onnx`` on onnxruntime's blocked kernels (``export --onnxruntime-nchwc``).
NCHWC_FILE = "model.nchwc.onnx"
_PTE_CHECK = "model.pte (ExecuTorch)"


def _export_batches(config: dict[str, Any], fixed_batch: int | None) -> tuple[Tensor, Tensor, Any]:
    """The example batch to export with, another batch to check on, and the dynamic shapes.

    Dynamic batch (``fixed_batch=None``): export at 4, check at 3. Fixed batch ``N``: export
    and check at ``N`` (two different batches)."""
    if fixed_batch is None:
        return _example_batch(config, 4), _example_batch(config, 7)[:3], ({0: _batch_dim()},)
    pair = _example_batch(config, 2 * fixed_batch)
    example = pair[:fixed_batch]
    check = pair[fixed_batch:] if len(pair) == 2 * fixed_batch else example
    return example, check, None


def _export_pt2(
    model: nn.Module,
    example: Tensor,
    check: Tensor,
    expected: Tensor,
    path: Path,
    dynamic_shapes: Any,
) -> float:
    """``torch.export`` (dynamic batch unless ``dynamic_shapes`` is None), saved to ``path``,
    reloaded and checked."""
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(path))
    with torch.no_grad():  # the file just written
        return verify_outputs(expected, torch.export.load(str(path)).module()(check), "model.pt2")


def _nchwc_source(
    model: nn.Module, example: Tensor, portable: Path, opset: int, dynamic_shapes: Any
) -> Path:
    """The ONNX file ``--onnxruntime-nchwc`` rewrites: ``portable`` (``model.onnx``), or, for
    a model with deployed DGC layers, a second export next to it under
    :class:`~dynaconv.layers.dgc.deployed.nchwc_export` (at a static batch of 1 their grouped
    convs gather whole blocks of channels, which the blocked convs then run)."""
    from ..layers.dgc.deployed import SparseDynamicGroupConv2d, nchwc_export
    from ..onnxruntime_nchwc import nchwc_block_size

    if not any(isinstance(m, SparseDynamicGroupConv2d) for m in model.modules()):
        return portable
    block = nchwc_block_size()
    if block == 0:  # write_nchwc says why
        return portable
    path = portable.with_name("model.nchwc-source.onnx")
    with nchwc_export(block):
        _export_onnx(model, example, path, opset, dynamic_shapes)
    return path


def _export_onnx(
    model: nn.Module, example: Tensor, path: Path, opset: int, dynamic_shapes: Any
) -> None:
    """``torch.onnx.export`` (dynamo) to ``path``; its messages to stderr."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                external_data=False,
            )
    except Exception as error:  # the exporter raises many types; all mean "no usable file"
        raise ExportError(f"torch.onnx.export failed: {_first_line(error)}") from error


def _run_onnx(path: Path, batch: Tensor) -> Any:
    """The first output of the ONNX file at ``path`` on ``batch``, run by onnxruntime."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": batch.numpy()})[0]
    except Exception as error:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        raise ExportError(
            "the ONNX file written by torch.onnx.export does not load or run in onnxruntime "
            f"({_first_line(error)}); no model file was kept"
        ) from error


def _lower_and_run_pte(model: nn.Module, example: Tensor, path: Path, batch: Tensor) -> Tensor:
    """:func:`write_pte` to ``path``, then the program's output on ``batch`` (:func:`run_pte`);
    :class:`ExportError` when lowering fails or ExecuTorch cannot load or run the file."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            write_pte(model, example, path)
    except Exception as error:  # ExecuTorch's lowering raises many types
        raise ExportError(f"ExecuTorch lowering failed: {_first_line(error)}") from error
    try:
        return run_pte(path, batch)
    except Exception as error:
        raise ExportError(
            "the ExecuTorch program does not load or run in ExecuTorch's runtime "
            f"({_first_line(error)}); no model file was kept"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _executorch() -> Any:
    """ExecuTorch's lowering entry points, or :class:`MissingExtraError` saying how to get them."""
    require_extras("edge", what="writing an ExecuTorch program (.pte)")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower, XnnpackPartitioner


def write_pte(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Write ``model`` as an ExecuTorch program for inputs of ``example``'s shape.

    ``torch.export`` (fixed shapes: the batch of ``example``), then ExecuTorch's edge dialect
    with the XNNPACK partitioner: convolutions, matrix products and most elementwise ops run
    in XNNPACK, the rest (e.g. a deployed CondenseNet's channel gathers) in ExecuTorch's
    portable kernels. Needs the ``edge`` extra (executorch). The file is written atomically.
    """
    lower, partitioner = _executorch()
    program = torch.export.export(model.eval(), (example,))
    lowered = lower(program, partitioner=[partitioner()]).to_executorch()
    path = Path(path)
    atomic_write_file(path, lambda tmp: Path(tmp).write_bytes(lowered.buffer))
    return path


def run_pte(path: str | Path, x: Tensor) -> Tensor:
    """The output of the ExecuTorch program at ``path`` on ``x`` (its ``forward``)."""
    require_extras("edge", what="running an ExecuTorch program (.pte)")
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return method.execute([x])[0]


#: The oldest opset the (dynamo) ONNX exporter writes directly.
MIN_OPSET = 18


def _max_opset() -> int:
    """The newest ONNX opset the installed exporter targets."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET

        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 23
