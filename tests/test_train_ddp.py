"""DDP on CPU (gloo): two processes end identical and match one process with the same batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dynaconv.train.config import resolve_config
from dynaconv.train.engine import Trainer


class TinyNet(nn.Module):
    """No BatchNorm, so one process on the global batch computes the same gradients."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _config(out: Path) -> dict:
    return resolve_config(
        None,
        overrides=[
            "model.convert.method=doconv",
            "data.batch_size=64",
            "data.train_subset=768",
            "data.augment=[random_crop]",
            "data.crop_padding=1",
            "train.epochs=2",
            "train.ema_decay=0.9",
            "optim.lr=0.1",
            "optim.warmup_epochs=0.5",
            "train.plots=false",
            "train.tensorboard=false",
            f"train.out_dir={out}",
        ],
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    try:
        trainer = Trainer(_config(Path(out) / "ddp"), network=TinyNet)
        trainer.fit()
        state = {
            "model": trainer.model.state_dict(),
            "ema": trainer.ema.module.state_dict(),
            "iteration": trainer.state["iteration"],
            "history": trainer.state["history"],
        }
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_match_each_other_and_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("model", "ema"):
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), (part, key)

    def without_time(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]

    assert without_time(rank0["history"]) == without_time(rank1["history"])
    assert rank0["iteration"] == 2 * (768 // 64)
    # only rank 0 wrote the run folder, once
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "best.pt",
        "best.safetensors",
        "config.yaml",
        "last.pt",
        "metrics.csv",
        "model.safetensors",
        "summary.json",
    ]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(_config(tmp_path / "single"), network=TinyNet)
        single.fit()
    finally:
        torch.set_num_threads(threads)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0["model"][key], value, rtol=1e-4, atol=1e-5)
    for key, value in single.ema.module.state_dict().items():
        torch.testing.assert_close(rank0["ema"][key], value, rtol=1e-4, atol=1e-5)
    assert (
        abs(rank0["history"][-1]["train_loss"] - single.state["history"][-1]["train_loss"]) < 1e-4
    )
