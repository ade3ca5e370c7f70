"""Data parallel training under torchrun: this process's rank and device, and the process group.

A plain `python -m model.train` is a world of one, and every method here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    started_here: bool = False  # we called init_process_group, so we destroy it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: Tensor) -> Tensor:
        """values summed over all ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(values)
        return values

    def close(self) -> None:
        """Every rank returns once rank 0 is done (it writes the model last)."""
        if self.started_here:
            dist.barrier()
            dist.destroy_process_group()


def setup(device: str, batch_size: int) -> tuple[Distributed, torch.device]:
    """The process group (under torchrun: WORLD_SIZE > 1) and this rank's device, for
    TrainConfig's device and batch_size."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "TrainConfig.device='cuda' but torch finds no CUDA device; use device='auto' or 'cpu'"
        )
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    chosen = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    if world_size == 1:
        return Distributed(), chosen
    if batch_size % world_size:
        raise ValueError(
            f"TrainConfig.batch_size={batch_size} must be divisible by the "
            f"number of processes ({world_size})"
        )
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), started), chosen
