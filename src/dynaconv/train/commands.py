"""eval, deploy, profile and export on a trained model.

A *trained model* is any of

* a training checkpoint ``last.pt`` / ``best.pt`` (the EMA weights when the run had an EMA,
  unless ``weights="model"``);
* a weights file ``*.safetensors`` written by training (its metadata holds the configuration);
* for ``eval`` only, a folder written by ``deploy`` (or its ``deployed.pt2``).

``deploy`` writes a folder that rebuilds the static model without any pickled code:
``config.yaml``, ``weights.safetensors`` (the trained weights), ``deployed.safetensors`` (the
deployed weights) and ``deployed.pt2`` (``torch.export``); :func:`load_deployed` rebuilds it
from the first three (build from the configuration, load the trained weights, ``deploy``, load
and compare the deployed weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dynaconv
from dynaconv.lifecycle import DeployVerificationError, verify_outputs

from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_safetensors
from .config import dump_config, set_path, validate_config
from .data import build_datasets, dataset_info
from .engine import build_model

__all__ = [
    "deploy_checkpoint",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_deployed",
    "load_trained",
    "profile_checkpoint",
]


def _apply(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        set_path(config, dotted, value)
    validate_config(config)
    return config


def load_trained(
    path: str | Path, weights: str = "ema", overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint or weights file (eval mode, CPU) and its configuration."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = load_weights(path)
        if metadata.get("format") != "dynaconv-train-weights" or "config" not in metadata:
            raise CheckpointError(
                f"{path} has no training configuration in its metadata; it was not written by "
                "dynaconv train (use a last.pt/best.pt checkpoint or model.safetensors)"
            )
        config = yaml.safe_load(metadata["config"])
        state = tensors
    else:
        payload = load_checkpoint(path)
        config = yaml.safe_load(payload["config"])
        state = (
            payload["ema"] if weights == "ema" and payload["ema"] is not None else payload["model"]
        )
    config = _apply(config, overrides or {})
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} does not fit the model of its configuration: {error}"
        ) from None
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_checkpoint(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    weights: str = "ema",
    device: str = "auto",
) -> dict[str, float]:
    """Validation loss and accuracy of a trained model (or of a ``deploy`` folder / .pt2)."""
    path = Path(path)
    target = _device(device)
    if path.is_dir() or path.suffix == ".pt2":
        folder = path if path.is_dir() else path.parent
        config = _apply(yaml.safe_load((folder / "config.yaml").read_text()), overrides or {})
        program = torch.export.load(str(folder / "deployed.pt2"))
        model: Any = program.module().to(target)
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


def deploy_checkpoint(
    path: str | Path, out: str | Path, overrides: dict[str, Any] | None = None, weights: str = "ema"
) -> dict[str, Any]:
    """Deploy, verify (on a validation batch), and write the static model folder."""
    model, config = load_trained(path, weights, overrides)
    example = _example_batch(config, 8)
    deployed = dynaconv.deploy(model, example_input=example)
    with torch.no_grad():
        expected = model(example)
        actual = deployed(example)
    error = verify_outputs(expected, actual, "deployed model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config))
    meta = {"format": "dynaconv-train-weights", "config": dump_config(config)}
    save_safetensors(model.state_dict(), out / "weights.safetensors", meta)
    save_safetensors(deployed.state_dict(), out / "deployed.safetensors", {**meta, "deployed": "1"})
    program = torch.export.export(deployed, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(out / "deployed.pt2"))
    reloaded = torch.export.load(str(out / "deployed.pt2")).module()
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


def load_deployed(folder: str | Path) -> nn.Module:
    """Rebuild the deployed model of a ``deploy`` folder (no pickled code involved)."""
    folder = Path(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    model = build_model(config)
    trained, _ = load_weights(folder / "weights.safetensors")
    model.load_state_dict(trained)
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
) -> dynaconv.Profile:
    """``dynaconv.profile`` of a trained model, or of a configured (untrained) one.

    ``progress`` first brings the schedules there (e.g. 1.0: an untrained CondenseNet
    condensed as at the end of training, so ``macs_active`` is what deployment will compute).
    """
    if path is not None:
        model, config = load_trained(path, weights)
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
) -> dict[str, Any]:
    """Write ``model.pt2`` (torch.export) and ``model.onnx``; check both against PyTorch.

    The ONNX model has a dynamic batch dimension; onnxruntime runs it on a batch of a size
    other than the one exported and must match PyTorch to 1e-4 (relative to the largest logit).
    """
    model, config = load_trained(path, weights, overrides)
    if deploy:
        model = dynaconv.deploy(model, example_input=_example_batch(config, 4))
    example = _example_batch(config, 4)
    check = _example_batch(config, 7)[:3]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch_dim = _batch_dim()
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim},))
    torch.export.save(program, str(out / "model.pt2"))
    with torch.no_grad():
        expected = model(check)
        pt2_error = verify_outputs(
            expected, torch.export.load(str(out / "model.pt2")).module()(check), "model.pt2"
        )
    onnx_path = out / "model.onnx"
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch_dim},),
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
        "max_rel_error_pt2": pt2_error,
        "max_rel_error_onnxruntime": onnx_error,
    }
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
