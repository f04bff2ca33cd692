"""Training on several processes (``torchrun``): which rank this is, and the few collective steps the run takes.

With one process (``world == 1``) every function here is a no-op that returns its input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.captioner import Captioner


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def start_process_group(ranks: Ranks, device: str) -> None:
    """Join the torchrun process group (NCCL on CUDA, else Gloo); nothing on one process."""
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" and torch.cuda.is_available() else "gloo")


def end_process_group(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value``, on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, in rank order (on every rank)."""
    if ranks.world == 1:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def all_reduce(value: torch.Tensor, ranks: Ranks) -> None:
    """Sum ``value`` over the ranks, in place."""
    if ranks.world > 1:
        dist.all_reduce(value)


def distributed(model: Captioner, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped for DDP: gradients of its trainable parameters averaged over the ranks."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
