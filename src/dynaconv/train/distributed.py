"""Processes and devices: joining ``torchrun``'s process group, seeding, collectives.

One process (CPU or one GPU) is a :class:`Distributed` of world size 1, for which every
collective here is the identity; under ``torchrun`` (``WORLD_SIZE`` > 1) the same calls
reduce, gather or broadcast over the process group (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError

__all__ = [
    "Distributed",
    "all_reduce_sum",
    "broadcast_buffers",
    "gather_tensor",
    "seed_everything",
    "setup_distributed",
]


@dataclass
class Distributed:
    """This process's place: ``rank`` of ``world`` processes, on ``device``."""

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
    """Join the process group that ``torchrun`` describes in the environment (if any).

    ``device_name`` is ``train.device`` (``auto``, ``cpu`` or ``cuda``); ``cuda`` without a
    CUDA device is a :class:`ConfigError`.
    """
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
    """Seed Python's, NumPy's and torch's generators; ``deterministic``: bitwise repeatable
    algorithms (``torch.use_deterministic_algorithms``, cuDNN without benchmarking)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def all_reduce_sum(values: list[float], ddp: Distributed) -> list[float]:
    """The sums of ``values`` over all processes (float64; the values themselves for one)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=ddp.device)
    if ddp.enabled:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_tensor(tensor: Tensor, ddp: Distributed) -> list[Tensor]:
    """Every process's ``tensor`` (same shape on all), in rank order, on the CPU."""
    if not ddp.enabled:
        return [tensor]
    moved = tensor.to(ddp.device)
    parts = [torch.empty_like(moved) for _ in range(ddp.world)]
    dist.all_gather(parts, moved)
    return [p.cpu() for p in parts]


def broadcast_buffers(modules: Iterable[nn.Module], ddp: Distributed) -> None:
    """Give every process rank 0's buffers of ``modules`` (e.g. BatchNorm statistics)."""
    if not ddp.enabled:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_object(value: Any, ddp: Distributed) -> Any:
    """Rank 0's ``value`` on every process (picklable; ``value`` itself for one process)."""
    if not ddp.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
