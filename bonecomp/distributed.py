"""The one place that knows about torchrun: this process's rank, barriers, agreed flags.

Without torchrun (``WORLD_SIZE`` unset) everything here is a no-op on rank 0 of 1, so
single-device code calls the same functions.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import constants

T = TypeVar("T")


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


# What a rank waits for in a collective once the job has started: torch's own defaults
# (NCCL 10 min, gloo 30 min), as before train.dist_timeout: a rank may wait long for rank 0
# (the cache build), unlike the rendezvous.
COLLECTIVE_TIMEOUT = {
    "nccl": constants.default_pg_nccl_timeout,
    "gloo": constants.default_pg_timeout,
}
TORCHRUN = (
    "start the script with torchrun (docs/pipeline.md), or unset WORLD_SIZE to train on one process"
)


def setup(device_pref: str = "auto", timeout_s: float = 300.0) -> Dist:
    """Join the torchrun process group (NCCL on CUDA, else gloo); rank 0 of 1 without.

    torchrun's variables are checked first (``check_env``). Joining prints what the rank
    waits for; ranks that do not all join within ``timeout_s`` (``train.dist_timeout``)
    end in one ``RankError`` line naming the address, instead of torch's 30 minutes."""
    env = check_env()
    if env is None:
        return Dist()
    world, rank, addr, port = env
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and not device_pref.startswith("cpu")
        print(
            f"{where(rank)}: waiting for {world} ranks at {addr}:{port} (up to "
            f"train.dist_timeout={timeout_s:g} s)",
            flush=True,
        )
        backend = "nccl" if use_nccl else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # DistStoreError (a timeout) is a RuntimeError
            raise RankError(
                f"{where(rank)}: not every one of the {world} ranks joined at {addr}:{port} "
                f"within train.dist_timeout={timeout_s:g} s ({_last_line(e)[:200]}); start "
                "them all (the same torchrun command on every node, with the same "
                "--master_addr and --master_port), or raise train.dist_timeout"
            ) from None
        if hasattr(dist, "set_timeout"):  # from here on, only collectives: torch's default
            dist.set_timeout(COLLECTIVE_TIMEOUT[backend])
        _exit_cleanly_on_sigterm()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def check_env() -> tuple[int, int, str, int] | None:
    """torchrun's variables, checked before any work: None without a job (``WORLD_SIZE``
    unset or 1), else (world, rank, MASTER_ADDR, MASTER_PORT). A variable missing, not a
    number or out of range is one ``RankError`` line saying which and what to do (torch
    would raise a traceback, or wait for a store that never comes)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    world = _whole(raw)
    if world is None or world < 1:
        raise RankError(f"{_var('WORLD_SIZE')} is not a whole number >= 1; {TORCHRUN}")
    if world == 1:
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RankError(
            f"WORLD_SIZE={world} without {', '.join(missing)}: torchrun sets them all; {TORCHRUN}"
        )
    rank, local = _whole(os.environ["RANK"]), _whole(os.environ.get("LOCAL_RANK", "0"))
    if rank is None or not 0 <= rank < world:
        raise RankError(
            f"{_var('RANK')} is not a rank of WORLD_SIZE={world} (0..{world - 1}); {TORCHRUN}"
        )
    if local is None or local < 0:
        raise RankError(f"{_var('LOCAL_RANK')} is not a whole number >= 0; {TORCHRUN}")
    port = _whole(os.environ["MASTER_PORT"])
    if port is None or not 0 < port < 2**16:
        raise RankError(f"{_var('MASTER_PORT')} is not a port (1..65535); {TORCHRUN}")
    return world, rank, os.environ["MASTER_ADDR"], port


def _var(name: str) -> str:
    """``NAME=value`` for a message (the value quoted unless it is a number)."""
    value = os.environ.get(name, "")
    return f"{name}={value}" if _whole(value) is not None else f"{name}={value!r}"


def _whole(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _exit_cleanly_on_sigterm() -> None:
    """torchrun ends a job's other processes with SIGTERM when one exits: raise
    ``SystemExit`` then, so their ``finally`` blocks and context managers still run (the
    run folder's lock and staged files are removed) and no traceback is printed."""
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))


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
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max(*values: float) -> tuple[float, ...]:
    """The largest of each value over ranks, in one all-reduce (themselves without a
    process group)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


class RankError(RuntimeError):
    """A problem found on some ranks of a torchrun job, raised on every rank with the
    same one-line message naming where it happened (so no rank waits for the others)."""


def where(rank: int | None = None) -> str:
    """``rank R (node N, host H)``: where a process of the job runs (for messages)."""
    rank = dist.get_rank() if rank is None and is_distributed() else rank or 0
    node = os.environ.get("GROUP_RANK", "0")  # torchrun's --node_rank
    return f"rank {rank} (node {node}, host {socket.gethostname()})"


def is_rank0() -> bool:
    """Whether this process is rank 0 (also without a process group)."""
    return not is_distributed() or dist.get_rank() == 0


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (itself without a process group); pickled whole,
    so for what fits in memory twice (a checkpoint on resume)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group).

    For small objects (hashes, messages): each is pickled and sent to every rank.
    """
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_agreed(
    fn: Callable[[], T], errors: tuple[type[BaseException], ...], on: bool = True
) -> T | None:
    """``fn()`` on the ranks where ``on`` is true; then every rank learns whether it
    failed anywhere, so every rank takes the same path (none waits in a collective for
    one that gave up).

    A failure with one of ``errors`` (the users' mistakes: data, disk, run folder) raises
    ``RankError`` on every rank with the first failed rank's message and where it ran: a
    problem of one node ends the job in one line everywhere. Any other exception (a bug)
    is re-raised with its traceback on its rank; the others raise a ``RankError`` that
    points there. Without a process group ``fn`` runs as it is. Returns ``fn()`` (None
    where it did not run).
    """
    if not is_distributed():
        return fn() if on else None
    result, problem, error = None, None, None
    if on:
        try:
            result = fn()
        except BaseException as e:  # every rank must hear of any failure
            error = e
            mistake = isinstance(e, errors)
            text = _last_line(e) if mistake else f"failed ({type(e).__name__}); see its traceback"
            problem = f"{where()}: {text}"
    problems = [p for p in all_gather_object(problem) if p is not None]
    if error is not None and not isinstance(error, errors):
        raise error
    if problems:
        more = f" (and {len(problems) - 1} more rank(s))" if len(problems) > 1 else ""
        raise RankError(problems[0] + more) from error
    return result


def _last_line(error: BaseException) -> str:
    """The last line of an exception's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def gather_rows(rows: np.ndarray, put: Callable[[int, int, np.ndarray], None]) -> None:
    """Send every rank's ``rows`` (an (n, ...) array, n may differ by rank) to rank 0,
    where ``put(rank, k, row)`` stores row ``k`` of ``rank`` (ranks other than 0 only).

    One row per collective, so rank 0 holds at most ``world`` rows at a time (out-of-fold
    maps are up to 15 MB a row and a validation share may hold hundreds; one
    ``gather_object`` of them all would need that much memory twice over). Every rank
    must call it, with rows of the same shape and dtype.
    """
    if not is_distributed():
        return
    rank = dist.get_rank()
    counts = all_gather_object(len(rows))
    device = _collective_device()
    blank = torch.zeros(rows.shape[1:], dtype=_torch_dtype(rows.dtype))
    for k in range(max(counts)):
        mine = torch.from_numpy(np.ascontiguousarray(rows[k])) if k < len(rows) else blank
        mine = mine.to(device)
        bufs = [torch.empty_like(mine) for _ in counts] if rank == 0 else None
        dist.gather(mine, bufs, dst=0)
        if rank == 0:
            for r in range(1, len(counts)):
                if k < counts[r]:
                    put(r, k, bufs[r].cpu().numpy())


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
