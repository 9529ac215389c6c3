"""Device memory: recognise running out, free what a failed step left, run in chunks.

CUDA raises ``torch.OutOfMemoryError`` when an allocation fails; the loops catch it
outside the ``except`` block (the traceback holds the failed step's tensors), free the
cache, halve their chunk of images and redo the work. A chunk of one image that still
does not fit is the user's to fix: ``BatchMemoryError`` says which key to change.

Without a GPU the same paths run under ``MemoryBudget``, a fake device that raises
``torch.OutOfMemoryError`` when a forward sees more images than it allows and reports a
peak that grows with the images (what the tests and the ``auto`` probe's tests use).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn


class BatchMemoryError(RuntimeError):
    """Out of memory with a chunk of one image: the message names the keys to change."""


def free_memory(device: torch.device) -> None:
    """Give the memory of a failed step back (call outside the ``except`` block)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def halve(size: int, key: str, hint: str) -> int:
    """The next chunk size after running out of memory with ``size`` images.

    At one image there is nothing left to halve: ``BatchMemoryError`` names ``key`` and
    what to do (``hint``).
    """
    if size <= 1:
        raise BatchMemoryError(f"out of memory with {key}=1 (one image per forward); {hint}")
    return size // 2


def spans(n: int, size: int | None) -> list[slice]:
    """``range(n)`` cut into consecutive slices of at most ``size`` (one slice if None)."""
    step = n if size is None else max(1, size)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def run_chunked(
    fn: Callable[[slice], torch.Tensor],
    n: int,
    size: int | None,
    device: torch.device,
    key: str,
    hint: str,
    say: Callable[[str], None] = print,
) -> tuple[torch.Tensor, int | None]:
    """``fn`` over ``range(n)`` in slices of at most ``size`` items, concatenated on dim 0.

    Outputs are per image (no gradients), so halving on ``torch.OutOfMemoryError`` and
    redoing the batch gives the same result. Returns the output and the size that worked
    (keep it for the next batch: the memory will not have grown back).
    """
    while True:
        failed = False
        try:
            return torch.cat([fn(s) for s in spans(n, size)]), size
        except torch.OutOfMemoryError:
            failed = True
        if failed:  # outside the except: its traceback no longer pins the tensors
            free_memory(device)
            smaller = halve(min(size or n, n), key, hint)
            say(f"out of memory with {min(size or n, n)} images per forward: {key} -> {smaller}")
            size = smaller


# ------------------------------------------------------------------------------ meters
class MemoryMeter(Protocol):
    """Peak memory of a device, as the ``auto`` probe measures it."""

    def total(self) -> int: ...

    def reset(self) -> None: ...

    def peak(self) -> int: ...

    def watch(self, model: nn.Module) -> contextlib.AbstractContextManager: ...


class CudaMeter:
    """The real GPU: total memory and the allocator's peak since ``reset``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def watch(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def device_meter(device: torch.device) -> MemoryMeter | None:
    """The meter of ``device``, or None where there is nothing to measure (CPU)."""
    return CudaMeter(device) if device.type == "cuda" else None


class MemoryBudget:
    """A fake device for tests: ``bytes_per_image`` per image of a forward, ``total`` bytes.

    ``attach(model)`` makes every forward of more images than fit raise
    ``torch.OutOfMemoryError`` (a forward pre-hook); ``ooms`` counts the raises and
    ``peak()`` is the largest forward seen since ``reset()``, in bytes.
    """

    def __init__(self, total: int, bytes_per_image: int = 1) -> None:
        self._total, self.bytes_per_image = total, bytes_per_image
        self.ooms, self._peak = 0, 0

    @property
    def max_images(self) -> int:
        return self._total // self.bytes_per_image

    def total(self) -> int:
        return self._total

    def reset(self) -> None:
        self._peak = 0

    def peak(self) -> int:
        return self._peak

    def _check(self, module: nn.Module, args: tuple) -> None:
        need = args[0].shape[0] * self.bytes_per_image
        if need > self._total:
            self.ooms += 1
            raise torch.OutOfMemoryError(f"fake device: {need} > {self._total} bytes")
        self._peak = max(self._peak, need)

    def attach(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return model.register_forward_pre_hook(self._check)

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        handle = self.attach(model)
        try:
            yield
        finally:
            handle.remove()
