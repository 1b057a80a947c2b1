"""The training loop: one CPU, one GPU or many processes (DDP through ``torchrun``).

Per iteration ``t`` of ``T`` (``T`` = epochs x iterations per epoch, or ``train.max_iters``
when that is smaller: the schedules then span exactly ``max_iters`` iterations, so a short run
is a complete run, compressed; ``T`` is the current configuration's, and a resume whose ``T``
differs from the checkpoint's says so in a warning line, because its schedules then continue
from ``t / T`` with the new ``T`` instead of bit-for-bit):

1. ``dynaconv.set_progress(model, t / T)``: every layer's schedule (condensation stages,
   gate schedules) follows the *global* iteration, so it is identical on every rank and after
   a resume;
2. the learning rate is set from the same ``t``: linear warm-up from ``warmup_start x lr``
   over ``warmup_epochs``, then cosine decay to ``min_lr`` (or constant);
3. loss = cross-entropy (optional label smoothing) + ``loss.aux_weight`` x
   ``dynaconv.aux_loss(model)``; with ``loss.resource.enabled`` the DGConv resource objective
   (:func:`~dynaconv.train.factory.resource_objective`) multiplies it;
4. backward (with a GradScaler under fp16 autocast), optional gradient-norm clipping, step,
   ``dynaconv.set_progress(model, (t + 1) / T)`` (so the final model is at progress 1.0),
   EMA update every ``train.ema_every`` iterations; the EMA's structural state (masks,
   stages, gates: :mod:`dynaconv.train.ema`) is copied from the model at *every* iteration,
   so it is always the model's whatever ``ema_every``.

Validation runs every ``train.eval_every_epochs`` epochs and after the last one; ``best.pt``
is chosen among the evaluated epochs (EMA accuracy when the EMA is enabled).

Checkpoints are written at the end of every epoch and, with ``train.checkpoint_every_iters``,
every N iterations (mid-epoch), always by rank 0 only; ``--resume`` continues bit-for-bit
(same data order, augmentation, RNG, schedule). The run folder's rules (no silent overwrite,
a consistent end-of-epoch set restored on resume, stale temporary files removed) are those of
:mod:`dynaconv.train.runfolder`; the checkpoint set is written and repaired by
:mod:`dynaconv.train.checkpoint_set`, resuming is :mod:`dynaconv.train.resume`, the logs
(``metrics.csv``, TensorBoard) are :mod:`dynaconv.train.runlog`: this module is the loop.

**Non-finite values stop the run and keep the last good set.** A loss that is NaN or infinite
on any rank raises :class:`NonFiniteLossError`; before any checkpoint replaces the previous
one, and before the final ``model.safetensors``, every floating-point tensor of the model and
of the EMA (parameters *and* buffers, e.g. BatchNorm statistics) is checked, and the first
non-finite one is named in the error; so is a resumed checkpoint's state when it is loaded.
``summary.json`` never holds NaN (a non-finite figure is ``null``).

The set-up lives beside this module: :mod:`dynaconv.train.distributed` (processes, devices,
seeding, collectives) and :mod:`dynaconv.train.factory` (network, optimizer, learning rate,
objective); their public names are also importable from here.

**Nothing in a configuration or a file runs code.** The network is built from ``model.name``
through model registries only (:func:`dynaconv.train.names.model_builder`); the DGConv resource
objective is :class:`dynaconv.layers.dgconv.resource_constraint.ResourceConstraint` itself; checkpoints load with
``weights_only=True``. A network of your own is trained by passing its builder from Python:
``Trainer(config, network=MyNet)``, called as ``MyNet(num_classes=...)`` after seeding.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dynaconv

from .checkpoint import (
    FORMAT,
    VERSION,
    atomic_write_text,
    capture_rng,
    json_text,
    model_state,
    save_safetensors,
)
from .checkpoint_set import CheckpointSet
from .config import ConfigError, RunConfig, dump_config, short_text
from .data import ResumableSampler, ShardSampler, build_datasets
from .distributed import (
    Distributed,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    gather_tensor,
    seed_everything,
    setup_distributed,
)
from .ema import ModelEMA
from .errors import NonFiniteLossError
from .factory import build_model, build_optimizer, learning_rate, resource_objective
from .names import known_model
from .resume import read_resume, restore_objects, resumed_state, score
from .runfolder import RunLock, prepare_run_folder, remove_artefacts
from .runlog import RunLog
from .runnames import RUNS, claim_run_folder, default_run_name
from .ui import Progress

__all__ = [
    "Distributed",
    "NonFiniteLossError",
    "Trainer",
    "build_model",
    "build_optimizer",
    "first_nonfinite",
    "known_model",
    "learning_rate",
    "resource_objective",
    "seed_everything",
    "setup_distributed",
    "train",
]


# --------------------------------------------------------------------------------------------
# checks


def first_nonfinite(modules: dict[str, nn.Module]) -> str | None:
    """``"PREFIX.NAME"`` of the first floating tensor (parameter or buffer) that is not finite.

    ``modules`` maps a prefix (``"model"``, ``"ema"``) to a module; None when all are finite.
    """
    for prefix, module in modules.items():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if (
                isinstance(tensor, Tensor)
                and tensor.is_floating_point()
                and not bool(tensor.detach().isfinite().all())
            ):
                return f"{prefix}.{name}"
    return None


# --------------------------------------------------------------------------------------------
# the trainer


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The line printed at the end of an epoch."""
    shown = (
        "(not evaluated)"
        if row["val_acc"] is None
        else f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}"
        + ("" if row["ema_val_acc"] is None else f" ema_acc {row['ema_val_acc']:.4f}")
    )
    return (
        f"epoch {row['epoch']}/{epochs}: train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_acc']:.4f} {shown}"
    )


class Trainer:
    """Builds everything from a resolved configuration; :meth:`fit` runs the training.

    Once built: ``model`` (the network), ``conversion_report`` (the
    :class:`~dynaconv.ConversionReport` of ``model.convert``; None without conversion),
    ``train_set`` / ``val_set`` / ``info`` (the data), ``out`` (the run folder).
    """

    def __init__(
        self,
        config: dict[str, Any],
        resume: str | Path | None = None,
        *,
        overwrite: bool = False,
        network: Callable[..., nn.Module] | None = None,
        verbose: bool = True,
    ) -> None:
        """``config``: a resolved configuration; ``resume``: a checkpoint to continue from;
        ``overwrite``: replace a previous run in the run folder (its artefacts are deleted
        when :meth:`fit` starts writing);
        ``network``: a builder of your own network, called as ``network(num_classes=...)``
        instead of building ``model.name`` (Python only; see :func:`build_model`);
        ``verbose``: print a line per epoch (stderr) and the summary (stdout); warnings are
        printed either way, the progress display is ``train.progress_bar``'s.

        The run folder is checked (and created) first, then the checkpoint to resume is read
        and checked, before any data is loaded or any model built.
        """
        self.settings = RunConfig.from_dict(config)  # validated; typed
        self.config = dict(config)  # a default name is filled in below, not in the caller's
        self.verbose = verbose
        self.ddp = setup_distributed(self.settings.train.device)
        self.device = self.ddp.device
        self.out, claimed = self._run_folder()
        resume = None if resume is None else Path(resume)
        try:
            self.replaced, self.lock = prepare_run_folder(
                self.out, resume=resume, overwrite=overwrite, is_main=self.ddp.is_main
            )
        except BaseException:
            if claimed and self.ddp.is_main and not any(self.out.iterdir()):
                self.out.rmdir()  # the folder this run named and created, still empty
            raise
        if claimed and self.lock is not None:
            self.lock.created = True  # claimed by this run: abandon may remove it
        self.resumed_from = resume
        self.checkpointed = False  # this run has written a checkpoint
        self.written: list[Path] = []  # files this run wrote before its first checkpoint
        try:
            self._build(self.config, resume, network)
        except BaseException:
            self._abandon()
            raise

    def _run_folder(self) -> tuple[Path, bool]:
        """``train.out_dir``, else ``runs/NAME``; without a name, one derived from the model,
        the method and the time, whose folder is claimed (created) here: ``(folder, claimed)``.
        """
        config, out_dir = self.config, self.settings.train.out_dir
        if config["name"] is None:
            if out_dir is not None:
                config["name"] = self.settings.name = default_run_name(config)
                return Path(out_dir), False
            folder = claim_run_folder(default_run_name(config)) if self.ddp.is_main else None
            folder = Path(broadcast_object(None if folder is None else str(folder), self.ddp))
            config["name"] = self.settings.name = folder.name
            return folder, True
        return Path(out_dir or RUNS / config["name"]), False

    def _build(
        self,
        config: dict[str, Any],
        resume: Path | None,
        network: Callable[..., nn.Module] | None,
    ) -> None:
        """Everything after the run folder's checks: data, model, optimizer, resumed state."""
        tc = self.settings.train
        payload = None if resume is None else read_resume(resume, self.config)
        seed_everything(tc.seed, tc.deterministic)
        self.train_set, self.val_set, self.info = build_datasets(config["data"], tc.seed)
        input_shape = [self.info.channels, self.info.image_size, self.info.image_size]
        self.checkpoints = CheckpointSet(self.out, input_shape)
        self._plan_iterations()
        self.model, self.conversion_report = build_model(
            config, self.info, network, return_report=True
        )
        self.model.to(self.device)
        self._check_forward()
        if self.ddp.enabled:
            torch.manual_seed(tc.seed + self.ddp.rank)  # different dropout per rank
        self.ema = ModelEMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None
        self.resource = self._resource_objective()
        self.optimizer = build_optimizer(self.model, config["optim"])
        amp = tc.amp
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.state = self._initial_state()
        if payload is not None:
            self._resume(resume, payload)
        self.net = self._wrap(self.model)

    def _abandon(self) -> None:
        """A run that fails before its first checkpoint removes what it wrote (and the
        folder when it created it), so that a rerun is not refused; the lock is released."""
        lock: RunLock | None = getattr(self, "lock", None)
        if lock is None:
            return
        if self.resumed_from is None and not self.checkpointed:
            lock.abandon(self.written)
        lock.release()

    def close(self) -> None:
        """Release the run folder's lock (:meth:`fit` does at its end)."""
        if self.lock is not None:
            self.lock.release()

    # ---- set-up helpers

    def _plan_iterations(self) -> None:
        """Per-process batch, iterations per epoch, total iterations and epochs of the run."""
        tc = self.settings.train
        global_batch = self.settings.data.batch_size
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
        planned = tc.epochs * self.iters_per_epoch
        self.total_iters = min(planned, tc.max_iters) if tc.max_iters else planned
        self.epochs = math.ceil(self.total_iters / self.iters_per_epoch)

    @torch.no_grad()
    def _check_forward(self) -> None:
        """One forward of a validation example (eval mode): a model that does not take the
        data's input, or gives fewer logits than the data has classes, is a
        :class:`ConfigError` before training instead of a traceback in the first epoch."""
        example = self.val_set[0][0].unsqueeze(0).to(self.device)
        name = self.settings.model.name
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(example)
        except (ValueError, RuntimeError) as error:
            raise ConfigError(
                f"{name} does not run on the data's input {tuple(example.shape[1:])}: "
                f"{short_text(str(error))}"
            ) from None
        finally:
            self.model.train(was_training)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ConfigError(f"{name} must return logits of shape (B, classes)")
        if logits.shape[1] < self.info.num_classes:
            raise ConfigError(
                f"{name} gives {logits.shape[1]} logits but the data has "
                f"{self.info.num_classes} classes"
            )

    def epochs_of_run(self) -> int:
        """The epochs (history rows) the run has when it ends: those done, plus those the
        remaining iterations span from the start of the current epoch. (A resume with a larger
        ``train.max_iters`` than the first run's continues past that run's last epoch.)"""
        state = self.state
        left = self.total_iters - (state["iteration"] - state["batches_done"])
        return state["epoch"] + max(0, math.ceil(left / self.iters_per_epoch))

    def _resource_objective(self) -> Callable[[Tensor], Tensor] | None:
        """The DGConv resource objective when ``loss.resource.enabled``, else None."""
        if not self.settings.loss.resource.enabled:
            return None
        resource = self.config["loss"]["resource"]
        shape = (self.info.channels, self.info.image_size, self.info.image_size)
        return resource_objective(self.model, resource, shape)

    def _initial_state(self) -> dict[str, Any]:
        """The training state of a run that has not started (a resume replaces it)."""
        return {
            "epoch": 0,
            "batches_done": 0,
            "iteration": 0,
            "best_acc": -1.0,
            "best_iteration": None,  # the iteration of best.pt (end of the best evaluated epoch)
            "history": [],
            "epoch_stats": [0.0, 0.0, 0.0],
            "world_size": self.ddp.world,
            "elapsed": 0.0,
            "total_iters": self.total_iters,  # the schedules' length T
        }

    def _wrap(self, model: nn.Module) -> nn.Module:
        mc = self.settings.model
        if mc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        net: nn.Module = model
        if self.ddp.enabled:
            if mc.sync_bn:
                if self.device.type != "cuda":
                    raise ConfigError(
                        "model.sync_bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only)"
                    )
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if mc.compile:
            net = torch.compile(net)
        return net

    def _resume(self, path: Path, payload: dict[str, Any]) -> None:
        ema = None if self.ema is None else self.ema.module
        restore_objects(
            path,
            payload,
            model=self.model,
            ema=ema,
            optimizer=self.optimizer,
            scaler=self.scaler,
            rank=self.ddp.rank,
        )
        self.check_finite(f"checkpoint {path}")
        self.state = resumed_state(
            self.state,
            path,
            payload,
            world=self.ddp.world,
            total_iters=self.total_iters,
            warn=self.ddp.is_main,
        )

    def _loader(self, dataset: Any, sampler: Any, batch: int, drop_last: bool) -> DataLoader:
        workers = self.settings.data.workers
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
        if self.settings.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    # ---- one step

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        aux_weight = self.settings.loss.aux_weight
        loss = F.cross_entropy(
            logits.float(), labels, label_smoothing=self.settings.optim.label_smoothing
        )
        if aux_weight:
            loss = loss + aux_weight * dynaconv.aux_loss(self.model).float()
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
        loss_sum, correct_sum, count = all_reduce_sum(
            [float(loss.detach()) * len(labels), float(correct), float(len(labels))], self.ddp
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
        clip = self.settings.optim.clip_grad_norm
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state["iteration"] = iteration + 1
        # Progress is iterations done / total: after the last step the schedules are at 1.0,
        # so the evaluated, checkpointed and deployed model has its final structure. (The
        # weights do not change before the next step, which would set the same value.)
        dynaconv.set_progress(self.model, self.state["iteration"] / self.total_iters)
        if self.ema is not None:
            if self.state["iteration"] % self.settings.train.ema_every == 0:
                self.ema.update(self.model)
            else:
                self.ema.copy_structure(self.model)
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
        loader = self._loader(self.val_set, sampler, self.settings.data.eval_batch_size, False)
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
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], self.ddp)
        return loss_sum / count, correct / count

    # ---- checkpoints and logs

    def _checkpoint_payload(self) -> dict[str, Any]:
        rng = capture_rng()
        rng["torch_per_rank"] = gather_tensor(torch.get_rng_state(), self.ddp)
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
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        broadcast_buffers(modules, self.ddp)

    def check_finite(self, origin: str | None = None) -> None:
        """:class:`NonFiniteLossError` naming the first non-finite tensor of the model or EMA
        (``origin``: the checkpoint they were just loaded from)."""
        modules = {"model": self.model}
        if self.ema is not None:
            modules["ema"] = self.ema.module
        bad = first_nonfinite(modules)
        if bad is None:
            return
        if origin is not None:
            raise NonFiniteLossError(
                f"{origin}: {bad} is NaN or infinite; it cannot be resumed (resume an earlier "
                "checkpoint)"
            )
        raise NonFiniteLossError(
            f"{bad} became NaN or infinite by iteration {self.state['iteration']}; stopping "
            f"without replacing the last good checkpoint set in {self.out}"
        )

    def save_checkpoint(self, best: bool = False) -> None:
        """``last.pt``, then (``best``) ``best.pt`` and ``best.safetensors``, each atomically.

        Every floating tensor of the model and the EMA is checked first: nothing non-finite
        ever replaces a good checkpoint. ``last.pt`` is written first: it is the source from
        which resuming restores the others (:mod:`dynaconv.train.runfolder`).
        """
        self.sync_buffers()
        self.check_finite()
        payload = self._checkpoint_payload()  # every rank joins the RNG gather
        if self.ddp.is_main:
            self.checkpoints.write_last(payload)
            self.checkpointed = True
            if best:
                self.checkpoints.write_best(payload)

    def eval_model(self) -> nn.Module:
        """The model used for validation and the final weights: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def repair_run_folder(self) -> list[str]:
        """Restore the end-of-epoch set from the resumed checkpoint (:meth:`CheckpointSet.repair`)."""
        return self.checkpoints.repair(self.state, self.resumed_from)

    # ---- the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end; returns the summary (also written to ``summary.json``)."""
        try:
            return self._fit()
        except BaseException:
            self._abandon()
            raise
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        tc = self.settings.train
        if self.ddp.is_main:
            remove_artefacts(self.replaced)  # --overwrite: the set-up succeeded
            if self.resumed_from is not None:
                for item in self.repair_run_folder():
                    print(f"resume: restored {item}", file=sys.stderr)
            self.written.append(self.out / "config.yaml")
            atomic_write_text(dump_config(self.config), self.out / "config.yaml")
            if tc.tensorboard and not (self.out / "tensorboard").exists():
                self.written.append(self.out / "tensorboard")
        self.epochs = self.epochs_of_run()
        self.log = RunLog(self.out, tensorboard=tc.tensorboard, enabled=self.ddp.is_main)
        self.log.open(self.state["iteration"])
        sampler = ResumableSampler(self.train_set, self.ddp.world, self.ddp.rank, tc.seed)
        progress = Progress(
            self.total_iters,
            self.state["iteration"],
            tc.progress_bar,
            tc.log_every_iters,
            enabled=self.ddp.is_main,
        )
        started = time.perf_counter() - self.state["elapsed"]
        try:
            while self.state["iteration"] < self.total_iters:
                self._train_epoch(sampler, progress)
                self.state["elapsed"] = time.perf_counter() - started
                self._end_epoch()
        finally:
            progress.close()
            self.log.close()
        self.state["elapsed"] = time.perf_counter() - started
        return self._finish()

    def _train_epoch(self, sampler: ResumableSampler, progress: Progress) -> None:
        epoch, done = self.state["epoch"], self.state["batches_done"]
        sampler.set_epoch(epoch)
        sampler.skip(done * self.local_batch)
        self.train_set.epoch = epoch
        loader = self._loader(self.train_set, sampler, self.local_batch, True)
        every = self.settings.train.checkpoint_every_iters
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
            if self.state["iteration"] % progress.every == 0:
                self.log.train_step(self.state["iteration"], loss, lr)
            if every and self.state["iteration"] % every == 0:
                self.save_checkpoint()

    def _end_epoch(self) -> None:
        """Validate (every ``train.eval_every_epochs`` epochs and after the last), log, save."""
        self.sync_buffers()
        row = self._epoch_row()
        accuracy = score(row)
        best = accuracy is not None and accuracy > self.state["best_acc"]
        if best:
            self.state["best_acc"] = accuracy
            self.state["best_iteration"] = self.state["iteration"]
        self.state["history"].append(row)
        self.state["epoch"] += 1
        self.state["batches_done"] = 0
        self.state["epoch_stats"] = [0.0, 0.0, 0.0]
        self.save_checkpoint(best=best)
        self.log.end_epoch(self.state["history"])
        if self.ddp.is_main and self.verbose:
            print(_epoch_line(row, self.epochs), file=sys.stderr)

    def _epoch_row(self) -> dict[str, Any]:
        """The history row of the epoch that ends (validated when it is due)."""
        number = self.state["epoch"] + 1
        evaluated = (
            number % self.settings.train.eval_every_epochs == 0
            or self.state["iteration"] >= self.total_iters
        )
        val_loss = val_acc = ema_acc = None
        if evaluated:
            val_loss, val_acc = self.evaluate(self.model)
            ema_acc = self.evaluate(self.ema.module)[1] if self.ema is not None else None
        loss_sum, correct, count = self.state["epoch_stats"]
        return {
            "epoch": number,
            "iteration": self.state["iteration"],
            "train_loss": loss_sum / max(count, 1),
            "train_acc": correct / max(count, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "ema_val_acc": ema_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed_s": round(self.state["elapsed"], 3),
        }

    def _finish(self) -> dict[str, Any]:
        final = self.eval_model()
        history = self.state["history"]
        summary: dict[str, Any] = {
            "name": self.settings.name,
            "epochs": len(history),
            "iterations": self.state["iteration"],
            "processes": self.ddp.world,
            "best_val_acc": self.state["best_acc"],
            "final_val_acc": score(history[-1]),
            "train_time_s": round(self.state["elapsed"], 2),
            "out_dir": str(self.out),
        }
        if not self.ddp.is_main:
            return summary
        self.check_finite()
        metadata = self.checkpoints.weights_metadata(
            dump_config(self.config), self.state["iteration"]
        )
        save_safetensors(model_state(final), self.out / "model.safetensors", metadata)
        shape = (1, self.info.channels, self.info.image_size, self.info.image_size)
        try:
            report = dynaconv.profile(final, shape, deployed=False)
            summary.update(
                params=report["params"], macs=report["macs"], macs_active=report["macs_active"]
            )
        except Exception as error:  # the summary must not fail on a profile issue
            summary["profile_error"] = str(error)
        if self.settings.train.plots:
            from .plots import plot_curves, plot_structure

            plot_curves(history, self.out / "curves.png")
            batch = torch.stack([self.val_set[i][0] for i in range(min(32, len(self.val_set)))])
            plot_structure(final, self.out, batch.to(self.device))
        atomic_write_text(json_text(summary), self.out / "summary.json")
        if self.verbose:
            print(yaml.safe_dump(summary, sort_keys=False).rstrip())
        return summary


def train(
    config: dict[str, Any],
    resume: str | Path | None = None,
    *,
    overwrite: bool = False,
    network: Callable[..., nn.Module] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train with ``config`` (resolved, see :mod:`dynaconv.train.config`); the summary.

    ``resume``, ``overwrite``, ``network`` and ``verbose`` as for :class:`Trainer`.
    """
    return Trainer(config, resume, overwrite=overwrite, network=network, verbose=verbose).fit()
