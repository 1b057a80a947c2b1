"""The training loop: one CPU, one GPU or many processes (DDP through ``torchrun``).

Per iteration ``t`` of ``T`` (``T`` = epochs x iterations per epoch, or ``train.max_iters``):

1. ``dynaconv.set_progress(model, t / T)``: every layer's schedule (condensation stages,
   gate schedules) follows the *global* iteration, so it is identical on every rank and after
   a resume;
2. the learning rate is set from the same ``t``: linear warm-up from ``warmup_start x lr``
   over ``warmup_epochs``, then cosine decay to ``min_lr`` (or constant);
3. loss = cross-entropy (optional label smoothing) + ``loss.aux_weight`` x
   ``dynaconv.aux_loss(model)``; with ``loss.resource.enabled`` the DGConv resource objective
   (:func:`resource_objective`) multiplies it;
4. backward (with a GradScaler under fp16 autocast), optional gradient-norm clipping, step,
   EMA update.

A loss that is NaN or infinite on any rank stops the run with :class:`NonFiniteLossError`;
the last good checkpoint is kept untouched. Checkpoints are written at the end of every epoch
and, with ``train.checkpoint_every_iters``, every N iterations (mid-epoch), always by rank 0
only; ``--resume`` continues bit-for-bit (same data order, augmentation, RNG, schedule).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dynaconv
from dynaconv.lifecycle import dynaconv_layers

from .checkpoint import (
    FORMAT,
    VERSION,
    atomic_save,
    capture_rng,
    load_checkpoint,
    model_state,
    restore_rng,
    save_safetensors,
)
from .config import ConfigError, dump_config, validate_config
from .data import DatasetInfo, ResumableSampler, ShardSampler, build_datasets, dataset_info
from .ema import ModelEMA
from .ui import Progress

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "build_model",
    "learning_rate",
    "resource_objective",
    "train",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# --------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Distributed(rank, world, local_rank, device)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# --------------------------------------------------------------------------------------------
# model, optimizer, schedule


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in dynaconv.models.MODELS:
        return lambda **kwargs: dynaconv.models.create_model(name, **kwargs)
    if ":" in name:  # "package.module:callable" for your own networks
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"model.name {name!r} cannot be imported: {error}") from None
    import torchvision

    if name in torchvision.models.list_models():
        return lambda **kwargs: torchvision.models.get_model(name, **kwargs)
    raise ConfigError(
        f"model.name {name!r} is neither a dynaconv model ({', '.join(sorted(dynaconv.models.MODELS))}), "
        "a torchvision model (torchvision.models.list_models()) nor 'module:callable'"
    )


def known_model(name: str) -> bool:
    """Whether :func:`build_model` can resolve ``name`` (without building it)."""
    try:
        _builder(name)
    except ConfigError:
        return False
    return True


def build_model(config: dict[str, Any], info: DatasetInfo | None = None) -> nn.Module:
    """The configured network (``num_classes`` from the dataset), converted if asked."""
    model_config = config["model"]
    info = info or dataset_info(config["data"])
    builder = _builder(model_config["name"])
    kwargs = dict(model_config["kwargs"])
    try:
        accepts = inspect.signature(builder).parameters
        takes_classes = "num_classes" in accepts or any(
            p.kind is p.VAR_KEYWORD for p in accepts.values()
        )
    except (TypeError, ValueError):
        takes_classes = True
    if takes_classes:
        kwargs.setdefault("num_classes", info.num_classes)
    model = builder(**kwargs)
    convert = model_config["convert"]
    if convert:
        model, report = dynaconv.convert(
            model,
            convert["method"],
            include=convert.get("include"),
            exclude=convert.get("exclude"),
            return_report=True,
            **(convert.get("options") or {}),
        )
        if not report.converted:
            raise ConfigError(
                f"model.convert: no layer of {model_config['name']} converted\n{report}"
            )
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = info.channels
    if first_conv is not None and first_conv.in_channels != channels:
        raise ConfigError(
            f"{model_config['name']} expects {first_conv.in_channels} input channels but the "
            f"data has {channels}; set data.channels={first_conv.in_channels} to repeat the "
            "grey channel, or use a model for this input"
        )
    return model


def _param_groups(model: nn.Module, optim: dict[str, Any]) -> list[dict[str, Any]]:
    if not optim["no_decay_norm_bias"]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(
                module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm
            )
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    groups = _param_groups(model, optim)
    if optim["name"] == "sgd":
        return torch.optim.SGD(
            groups,
            lr=optim["lr"],
            momentum=optim["momentum"],
            nesterov=optim["nesterov"] and optim["momentum"] > 0,
            weight_decay=optim["weight_decay"],
        )
    if optim["name"] == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            eps=optim["eps"],
            weight_decay=optim["weight_decay"],
        )
    return torch.optim.RMSprop(
        groups,
        lr=optim["lr"],
        alpha=optim["alpha"],
        eps=optim["eps"],
        momentum=optim["momentum"],
        weight_decay=optim["weight_decay"],
    )


def learning_rate(optim: dict[str, Any], iteration: int, total: int, per_epoch: int) -> float:
    """The learning rate of ``iteration`` (0-based) of ``total``: warm-up, then cosine."""
    peak, floor = optim["lr"], optim["min_lr"]
    warmup = min(round(optim["warmup_epochs"] * per_epoch), total)
    if iteration < warmup:
        start = optim["warmup_start"]
        return peak * (start + (1.0 - start) * iteration / warmup)
    if optim["schedule"] == "constant":
        return peak
    span = max(total - warmup, 1)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * (iteration - warmup) / span))


# --------------------------------------------------------------------------------------------
# losses


def _resource_helper(spec: str) -> Callable[..., Callable[[Tensor], Tensor]] | None:
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        return None


class _FallbackResourceConstraint:
    """The resource objective computed here when the DGConv helper is not available.

    ``cost`` = sum over the DGConv layers of ``aux_loss()`` (active connections) x ``kh * kw``
    (kept kernel entries); the budget is ``budget`` x their dense ``Cin * Cout * kh * kw``.
    """

    def __init__(self, model: nn.Module, budget: float, exponent: float) -> None:
        self.layers = [layer for _, layer in dynaconv_layers(model) if layer.method == "dgconv"]
        if not self.layers:
            raise ConfigError("loss.resource.enabled needs DGConv layers in the model")
        dense = sum(
            layer.in_channels * layer.out_channels * layer.spec.kernel_numel
            for layer in self.layers
        )
        self.budget = budget * dense
        self.exponent = exponent

    def __call__(self, loss: Tensor) -> Tensor:
        cost = torch.stack(
            [
                layer.aux_loss().float().reshape(()) * layer.spec.kernel_numel
                for layer in self.layers
            ]
        ).sum()
        factor = (cost / self.budget) ** self.exponent
        return torch.where(cost > self.budget, loss * factor, loss)


def resource_objective(
    model: nn.Module, resource: dict[str, Any], input_shape: tuple[int, int, int]
) -> Callable[[Tensor], Tensor]:
    """DGConv's resource-constrained objective as a function ``loss -> loss``.

    ``loss * (cost / budget) ** exponent`` while the DGConv layers' cost (parameters or MACs,
    ``loss.resource.budget_type``) exceeds ``budget`` x its dense value, else ``loss`` (the
    authors' ``(budget / cost) ** 0.02`` with the sign that penalises going over budget). The
    class named by ``loss.resource.helper`` (``"module:callable"``, by default
    ``dynaconv.layers.dgconv:ResourceConstraint``) is built once as
    ``helper(model, budget=, budget_type=, input_shape=, exponent=)``; when it is not available
    the objective is computed here (``budget_type="params"`` only).
    """
    helper = _resource_helper(resource["helper"])
    if helper is not None:
        return helper(
            model,
            budget=resource["budget"],
            budget_type=resource["budget_type"],
            input_shape=input_shape,
            exponent=resource["exponent"],
        )
    if resource["budget_type"] != "params":
        raise ConfigError(
            f"loss.resource.budget_type={resource['budget_type']!r} needs {resource['helper']}, "
            "which is not available; use budget_type=params"
        )
    return _FallbackResourceConstraint(model, resource["budget"], resource["exponent"])


# --------------------------------------------------------------------------------------------
# the trainer


def _gather_tensor(tensor: Tensor, ddp: Distributed) -> list[Tensor]:
    if not ddp.enabled:
        return [tensor]
    moved = tensor.to(ddp.device)
    parts = [torch.empty_like(moved) for _ in range(ddp.world)]
    dist.all_gather(parts, moved)
    return [p.cpu() for p in parts]


class Trainer:
    """Builds everything from a resolved configuration; :meth:`fit` runs the training."""

    def __init__(self, config: dict[str, Any], resume: str | Path | None = None) -> None:
        validate_config(config)
        self.config = config
        tc = config["train"]
        self.ddp = setup_distributed(tc["device"])
        self.device = self.ddp.device
        seed_everything(tc["seed"], tc["deterministic"])
        self.out = Path(tc["out_dir"] or Path("runs") / config["name"])
        self.train_set, self.val_set, self.info = build_datasets(config["data"], tc["seed"])
        global_batch = config["data"]["batch_size"]
        if global_batch % self.ddp.world:
            raise ConfigError(
                f"data.batch_size {global_batch} must be divisible by the {self.ddp.world} processes"
            )
        self.local_batch = global_batch // self.ddp.world
        self.iters_per_epoch = len(self.train_set) // global_batch
        if self.iters_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size {global_batch} exceeds the {len(self.train_set)} training examples"
            )
        planned = tc["epochs"] * self.iters_per_epoch
        self.total_iters = min(planned, tc["max_iters"]) if tc["max_iters"] else planned
        self.epochs = math.ceil(self.total_iters / self.iters_per_epoch)

        self.model = build_model(config, self.info).to(self.device)
        if self.ddp.enabled:
            torch.manual_seed(tc["seed"] + self.ddp.rank)  # different dropout per rank
        self.ema = ModelEMA(self.model, tc["ema_decay"]) if tc["ema_decay"] > 0 else None
        resource = config["loss"]["resource"]
        self.resource = (
            resource_objective(
                self.model,
                resource,
                (self.info.channels, self.info.image_size, self.info.image_size),
            )
            if resource["enabled"]
            else None
        )
        self.optimizer = build_optimizer(self.model, config["optim"])
        amp = tc["amp"]
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.state: dict[str, Any] = {
            "epoch": 0,
            "batches_done": 0,
            "iteration": 0,
            "best_acc": -1.0,
            "history": [],
            "epoch_stats": [0.0, 0.0, 0.0],
            "world_size": self.ddp.world,
            "elapsed": 0.0,
        }
        if resume is not None:
            self._resume(Path(resume))
        self.net = self._wrap(self.model)

    # ---- set-up helpers

    def _wrap(self, model: nn.Module) -> nn.Module:
        mc = self.config["model"]
        if mc["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        net: nn.Module = model
        if self.ddp.enabled:
            if mc["sync_bn"]:
                if self.device.type != "cuda":
                    raise ConfigError(
                        "model.sync_bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only)"
                    )
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if mc["compile"]:
            net = torch.compile(net)
        return net

    def _resume(self, path: Path) -> None:
        payload = load_checkpoint(path)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        if self.ema is not None:
            if payload["ema"] is None:
                raise ConfigError(f"{path} has no EMA state but train.ema_decay is set")
            self.ema.load_state_dict(payload["ema"])
        self.state.update(payload["state"])
        if self.state["world_size"] != self.ddp.world and self.ddp.is_main:
            print(
                f"warning: {path} was written by {self.state['world_size']} processes, resuming "
                f"with {self.ddp.world}: the data order of the interrupted epoch changes",
                file=sys.stderr,
            )
        rng = payload["rng"]
        restore_rng(rng)
        per_rank = rng.get("torch_per_rank") or []
        if self.ddp.rank < len(per_rank):
            torch.set_rng_state(per_rank[self.ddp.rank])
        self.state["world_size"] = self.ddp.world

    def _loader(self, dataset: Any, sampler: Any, batch: int, drop_last: bool) -> DataLoader:
        workers = self.config["data"]["workers"]
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # A private generator: creating a loader never consumes the global RNG.
            generator=torch.Generator().manual_seed(0),
        )

    def _autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.config["model"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.ddp.enabled:
            dist.all_reduce(tensor)
        return tensor.tolist()

    # ---- one step

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        lc = self.config["loss"]
        loss = F.cross_entropy(
            logits.float(), labels, label_smoothing=self.config["optim"]["label_smoothing"]
        )
        if lc["aux_weight"]:
            loss = loss + lc["aux_weight"] * dynaconv.aux_loss(self.model).float()
        if self.resource is not None:
            loss = self.resource(loss)
        return loss

    def _step(self, images: Tensor, labels: Tensor) -> tuple[float, float]:
        iteration = self.state["iteration"]
        dynaconv.set_progress(self.model, iteration / self.total_iters)
        lr = learning_rate(self.config["optim"], iteration, self.total_iters, self.iters_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            logits = self.net(images)
        loss = self._loss(logits, labels)
        correct = (logits.argmax(1) == labels).sum()
        loss_sum, correct_sum, count = self._reduce(
            [float(loss.detach()) * len(labels), float(correct), float(len(labels))]
        )
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"the loss became {loss_sum / count} at iteration {iteration} "
                f"(epoch {self.state['epoch']}); stopping. The last good checkpoint is "
                f"{self.out / 'last.pt'} (if one was written). Lower optim.lr, enable "
                "optim.clip_grad_norm or use train.amp=bf16 instead of fp16."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.config["optim"]["clip_grad_norm"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state["iteration"] = iteration + 1
        if (
            self.ema is not None
            and self.state["iteration"] % self.config["train"]["ema_every"] == 0
        ):
            self.ema.update(self.model)
        stats = self.state["epoch_stats"]
        stats[0] += loss_sum
        stats[1] += correct_sum
        stats[2] += count
        return loss_sum / count, correct_sum / count

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """Validation loss and accuracy of ``model`` (all ranks; each evaluates a shard)."""
        sampler = ShardSampler(len(self.val_set), self.ddp.world, self.ddp.rank)
        loader = self._loader(self.val_set, sampler, self.config["data"]["eval_batch_size"], False)
        was_training = model.training
        model.eval()
        loss_sum = correct = count = 0.0
        for images, labels in loader:
            images, labels = self._to_device(images, labels)
            with self._autocast():
                logits = model(images)
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            count += len(labels)
        model.train(was_training)
        loss_sum, correct, count = self._reduce([loss_sum, correct, count])
        return loss_sum / count, correct / count

    # ---- checkpoints and logs

    def _checkpoint_payload(self) -> dict[str, Any]:
        rng = capture_rng()
        rng["torch_per_rank"] = _gather_tensor(torch.get_rng_state(), self.ddp)
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": dump_config(self.config),
            "model": model_state(self.model),
            "ema": None if self.ema is None else model_state(self.ema.module),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "state": dict(self.state),
            "rng": rng,
        }

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics of the model and the EMA).

        Parameters and schedule state are identical on every rank by construction; BatchNorm
        running statistics are not (each rank normalises its own shard unless SyncBatchNorm).
        """
        if not self.ddp.enabled:
            return
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def save_checkpoint(self, best: bool = False) -> None:
        self.sync_buffers()
        if not all(bool(p.isfinite().all()) for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"the weights became NaN or infinite at iteration {self.state['iteration']}; "
                f"stopping without overwriting the last good checkpoint in {self.out}"
            )
        payload = self._checkpoint_payload()  # every rank joins the RNG gather
        if self.ddp.is_main:
            atomic_save(payload, self.out / "last.pt")
            if best:
                atomic_save(payload, self.out / "best.pt")

    def eval_model(self) -> nn.Module:
        """The model used for validation and the final weights: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def _weights_metadata(self) -> dict[str, str]:
        shape = [self.info.channels, self.info.image_size, self.info.image_size]
        return {
            "format": "dynaconv-train-weights",
            "config": dump_config(self.config),
            "input_shape": json.dumps(shape),
        }

    def _write_history(self, writer: Any) -> None:
        rows = self.state["history"]
        path = self.out / "metrics.csv"
        with open(path, "w", newline="") as handle:
            table = csv.DictWriter(handle, fieldnames=list(rows[0]))
            table.writeheader()
            table.writerows(rows)
        if writer is not None:
            row = rows[-1]
            for key, value in row.items():
                if key not in ("epoch", "iteration") and value is not None:
                    writer.add_scalar(f"epoch/{key}", value, row["epoch"])
            writer.flush()

    def _tensorboard(self) -> Any:
        if not (self.ddp.is_main and self.config["train"]["tensorboard"]):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(
            str(self.out / "tensorboard"), purge_step=self.state["iteration"] or None
        )

    # ---- the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end; returns the summary (also written to ``summary.json``)."""
        tc = self.config["train"]
        if self.ddp.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(self.config))
        writer = self._tensorboard()
        sampler = ResumableSampler(self.train_set, self.ddp.world, self.ddp.rank, tc["seed"])
        progress = Progress(
            self.total_iters,
            self.state["iteration"],
            tc["progress_bar"],
            tc["log_every_iters"],
            enabled=self.ddp.is_main,
        )
        started = time.perf_counter() - self.state["elapsed"]
        try:
            while self.state["iteration"] < self.total_iters:
                self._train_epoch(sampler, progress, writer)
                self.state["elapsed"] = time.perf_counter() - started
                self._end_epoch(writer)
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        self.state["elapsed"] = time.perf_counter() - started
        return self._finish()

    def _train_epoch(self, sampler: ResumableSampler, progress: Progress, writer: Any) -> None:
        epoch, done = self.state["epoch"], self.state["batches_done"]
        sampler.set_epoch(epoch)
        sampler.skip(done * self.local_batch)
        self.train_set.epoch = epoch
        loader = self._loader(self.train_set, sampler, self.local_batch, True)
        every = self.config["train"]["checkpoint_every_iters"]
        self.net.train()
        for images, labels in loader:
            if self.state["iteration"] >= self.total_iters:
                break
            images, labels = self._to_device(images, labels)
            tick = time.perf_counter()
            loss, acc = self._step(images, labels)
            self.state["batches_done"] += 1
            lr = self.optimizer.param_groups[0]["lr"]
            progress.update(
                epoch, loss, acc, lr, len(labels) * self.ddp.world, time.perf_counter() - tick
            )
            if writer is not None and self.state["iteration"] % progress.every == 0:
                writer.add_scalar("train/loss", loss, self.state["iteration"])
                writer.add_scalar("train/lr", lr, self.state["iteration"])
            if every and self.state["iteration"] % every == 0:
                self.save_checkpoint()

    def _end_epoch(self, writer: Any) -> None:
        self.sync_buffers()
        val_loss, val_acc = self.evaluate(self.model)
        ema_acc = self.evaluate(self.ema.module)[1] if self.ema is not None else None
        loss_sum, correct, count = self.state["epoch_stats"]
        row = {
            "epoch": self.state["epoch"] + 1,
            "iteration": self.state["iteration"],
            "train_loss": loss_sum / max(count, 1),
            "train_acc": correct / max(count, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "ema_val_acc": ema_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed_s": round(self.state["elapsed"], 3),
        }
        score = ema_acc if ema_acc is not None else val_acc
        best = score > self.state["best_acc"]
        if best:
            self.state["best_acc"] = score
        self.state["history"].append(row)
        self.state["epoch"] += 1
        self.state["batches_done"] = 0
        self.state["epoch_stats"] = [0.0, 0.0, 0.0]
        self.save_checkpoint(best=best)
        if self.ddp.is_main:
            self._write_history(writer)
            if best:
                save_safetensors(
                    model_state(self.eval_model()),
                    self.out / "best.safetensors",
                    self._weights_metadata(),
                )
            ema_text = "" if ema_acc is None else f" ema_acc {ema_acc:.4f}"
            print(
                f"epoch {row['epoch']}/{self.epochs}: train_loss {row['train_loss']:.4f} "
                f"train_acc {row['train_acc']:.4f} val_loss {val_loss:.4f} val_acc {val_acc:.4f}"
                f"{ema_text}",
                file=sys.stderr,
            )

    def _finish(self) -> dict[str, Any]:
        final = self.eval_model()
        history = self.state["history"]
        summary: dict[str, Any] = {
            "name": self.config["name"],
            "epochs": len(history),
            "iterations": self.state["iteration"],
            "processes": self.ddp.world,
            "best_val_acc": self.state["best_acc"],
            "final_val_acc": history[-1]["ema_val_acc"] or history[-1]["val_acc"],
            "train_time_s": round(self.state["elapsed"], 2),
            "out_dir": str(self.out),
        }
        if not self.ddp.is_main:
            return summary
        save_safetensors(
            model_state(final), self.out / "model.safetensors", self._weights_metadata()
        )
        shape = (1, self.info.channels, self.info.image_size, self.info.image_size)
        try:
            report = dynaconv.profile(final, shape, deployed=False)
            summary.update(
                params=report["params"], macs=report["macs"], macs_active=report["macs_active"]
            )
        except Exception as error:  # the summary must not fail on a profile issue
            summary["profile_error"] = str(error)
        if self.config["train"]["plots"]:
            from .plots import plot_curves, plot_structure

            plot_curves(history, self.out / "curves.png")
            batch = torch.stack([self.val_set[i][0] for i in range(min(32, len(self.val_set)))])
            plot_structure(final, self.out, batch.to(self.device))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(yaml.safe_dump(summary, sort_keys=False).rstrip())
        return summary


def train(config: dict[str, Any], resume: str | Path | None = None) -> dict[str, Any]:
    """Train with ``config`` (resolved, see :mod:`dynaconv.train.config`); the summary."""
    return Trainer(config, resume).fit()
