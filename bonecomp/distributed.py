"""The one place that knows about torchrun: this process's rank, barriers, agreed flags.

Without torchrun (``WORLD_SIZE`` unset) everything here is a no-op on rank 0 of 1, so
single-device code calls the same functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device_pref: str = "auto") -> Dist:
    """Join the torchrun process group (NCCL on CUDA, else gloo); rank 0 of 1 without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and not device_pref.startswith("cpu")
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """End the process group (once, after the last fold)."""
    if is_distributed():
        dist.destroy_process_group()


def all_ranks_true(flag: torch.Tensor | bool) -> bool:
    """``flag`` on this rank and on every other (one all-reduce under DDP).

    Decisions that change what a rank does next (stop, raise) must be the same on every
    rank, or the others wait forever in a collective.
    """
    return bool(all_reduce_min(int(bool(flag))))


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over ranks in place (no-op without a process group)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t)


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over ranks (itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
