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

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dynaconv
from dynaconv.lifecycle import DeployVerificationError, verify_outputs

from .checkpoint import (
    CheckpointError,
    check_file,
    load_checkpoint,
    load_state,
    load_weights,
    save_safetensors,
)
from .config import ConfigError, config_from_text, dump_config, set_path, validate_config
from .data import build_datasets, dataset_info
from .factory import build_model
from .runfolder import make_writable_folder

__all__ = [
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
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
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


def prepare_output_folder(out: str | Path, flag: str = "--out") -> Path:
    """Create ``out`` (a writable folder) before any work, or :class:`ConfigError` naming it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a folder")
    try:
        make_writable_folder(out)
    except OSError as error:
        raise ConfigError(
            f"{flag} {out} cannot be created or written: {error.strerror or error}"
        ) from None
    return out


def deploy_checkpoint(
    path: str | Path, out: str | Path, overrides: dict[str, Any] | None = None, weights: str = "ema"
) -> dict[str, Any]:
    """Deploy, verify (on a validation batch), and write the static model folder."""
    model, config = load_trained(path, weights, overrides)
    out = prepare_output_folder(out)
    example = _example_batch(config, 8)
    deployed = dynaconv.deploy(model, example_input=example)
    with torch.no_grad():
        expected = model(example)
        actual = deployed(example)
    error = verify_outputs(expected, actual, "deployed model")
    (out / "config.yaml").write_text(dump_config(config))
    meta = {"format": "dynaconv-train-weights", "config": dump_config(config)}
    save_safetensors(model.state_dict(), out / "weights.safetensors", meta)
    save_safetensors(deployed.state_dict(), out / "deployed.safetensors", {**meta, "deployed": "1"})
    program = torch.export.export(deployed, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(out / "deployed.pt2"))
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
        raise CheckpointError(f"{folder}/deployed.safetensors does not match the rebuilt model")
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


def export_checkpoint(
    path: str | Path,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    weights: str = "ema",
    deploy: bool = True,
    opset: int = 18,
    fixed_batch: int | None = None,
    format: str = "onnx",
) -> dict[str, Any]:
    """Write ``model.pt2`` (torch.export) and ``model.onnx``; check both against PyTorch.

    ``format="pte"``: ``model.pte`` (an ExecuTorch program, convolutions and matrix products
    delegated to XNNPACK: the mobile CPU runtime, :func:`write_pte`) instead of
    ``model.onnx``, for a fixed batch (``fixed_batch``, default 1), checked in ExecuTorch's
    runtime.

    By default both have a dynamic batch dimension; onnxruntime runs the ONNX model on a
    batch of a size other than the one exported and must match PyTorch to 1e-4 (relative to
    the largest logit). ``fixed_batch=N`` exports for batches of exactly ``N`` (the edge case,
    ``N = 1``): layers whose best graph depends on the batch size use it (a CondConv kxk layer
    becomes the kernel mixing and one convolution, see
    :func:`dynaconv.functional.condconv.fixed_batch_graph`); the check runs another batch of
    ``N``.
    """
    if not MIN_OPSET <= opset <= _max_opset():
        raise ConfigError(f"--opset must be in [{MIN_OPSET}, {_max_opset()}], got {opset}")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format == "pte":
        _executorch()  # missing: say so before any work
        fixed_batch = 1 if fixed_batch is None else fixed_batch
    if fixed_batch is not None and (
        isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or fixed_batch < 1
    ):
        raise ConfigError(f"--batch must be a positive integer, got {fixed_batch!r}")
    model, config = load_trained(path, weights, overrides)
    out = prepare_output_folder(out)
    if deploy:
        model = dynaconv.deploy(model, example_input=_example_batch(config, 4))
    if fixed_batch is None:
        example = _example_batch(config, 4)
        check = _example_batch(config, 7)[:3]
        dynamic_shapes: Any = ({0: _batch_dim()},)
    else:
        pair = _example_batch(config, 2 * fixed_batch)
        example = pair[:fixed_batch]
        check = pair[fixed_batch:] if len(pair) == 2 * fixed_batch else example
        dynamic_shapes = None
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(out / "model.pt2"))
    with torch.no_grad():
        expected = model(check)
        pt2_error = verify_outputs(
            # the file just written
            expected,
            torch.export.load(str(out / "model.pt2")).module()(check),
            "model.pt2",
        )
    if format == "pte":
        pte_path = write_pte(model, example, out / "model.pte")
        pte_error = verify_outputs(expected, run_pte(pte_path, check), "model.pte (ExecuTorch)")
        summary = {
            "pt2": str(out / "model.pt2"),
            "pte": str(pte_path),
            "deployed": deploy,
            "batch": fixed_batch,
            "max_rel_error_pt2": pt2_error,
            "max_rel_error_executorch": pte_error,
        }
        (out / "config.yaml").write_text(dump_config(config))
        (out / "export.json").write_text(json.dumps(summary, indent=2))
        return summary
    onnx_path = out / "model.onnx"
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": check.numpy()})
    onnx_error = verify_outputs(expected, torch.from_numpy(onnx_out), "ONNX model (onnxruntime)")
    (out / "config.yaml").write_text(dump_config(config))
    summary = {
        "pt2": str(out / "model.pt2"),
        "onnx": str(onnx_path),
        "deployed": deploy,
        "batch": "dynamic" if fixed_batch is None else fixed_batch,
        "max_rel_error_pt2": pt2_error,
        "max_rel_error_onnxruntime": onnx_error,
    }
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary


#: What ``export`` writes besides ``model.pt2``.
EXPORT_FORMATS = ("onnx", "pte")


def _executorch() -> Any:
    """ExecuTorch's lowering entry points, or :class:`ConfigError` saying how to get them."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise ConfigError(
            f"--format pte needs ExecuTorch (pip install 'dynaconv[edge]'): {error}"
        ) from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def write_pte(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Write ``model`` as an ExecuTorch program for inputs of ``example``'s shape.

    ``torch.export`` (fixed shapes: the batch of ``example``), then ExecuTorch's edge dialect
    with the XNNPACK partitioner: convolutions, matrix products and most elementwise ops run
    in XNNPACK, the rest (e.g. a deployed CondenseNet's channel gathers) in ExecuTorch's
    portable kernels. Needs the ``edge`` extra (executorch).
    """
    lower, partitioner = _executorch()
    program = torch.export.export(model.eval(), (example,))
    lowered = lower(program, partitioner=[partitioner()]).to_executorch()
    path = Path(path)
    path.write_bytes(lowered.buffer)
    return path


def run_pte(path: str | Path, x: Tensor) -> Tensor:
    """The output of the ExecuTorch program at ``path`` on ``x`` (its ``forward``)."""
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
