"""One epoch of training, one pass of validation: plain functions returning metric dicts.

Validation scores the leaderboard's way: logits at the model's resolution are upsampled
exactly to each image's original size (2048) and thresholded sparsely, then compared with
the ground truth drawn exactly in each class's bounding box. Only counts are kept.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bonecomp.data.annotations import Polygons
from bonecomp.data.dataset import to_float_image, to_float_mask
from bonecomp.data.rasterize import truth_crops
from bonecomp.distributed import all_ranks_true, all_reduce_sum, is_distributed
from bonecomp.inference.postprocess import overlap_counts, upsample_threshold
from bonecomp.memory import free_memory, halve, run_chunked, spans
from bonecomp.metrics import DiceAccumulator


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the batch and its images."""


class GroundTruth(Protocol):
    """Where validation finds each item's truth: its polygons and source (H, W).

    The training cache is one (``TrainCache``); any table of images and JSONs can be.
    """

    def polygons(self, i: int) -> Polygons: ...

    def src_hw(self, i: int) -> tuple[int, int]: ...


@dataclass
class StepContext:
    """What a training step needs besides model, data and optimizer."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype on CUDA, None for float32
    scaler: torch.amp.GradScaler | None = None
    accum_steps: int = 1
    grad_clip: float | None = None
    channels_last: bool = False
    ema: nn.Module | None = None
    progress: bool = True
    soft_targets: bool = False  # compact uint8 masks hold coverage 0..255
    micro_batch: int | None = None  # images per training forward (None: the loader's batch)
    eval_micro_batch: int | None = None  # images per validation forward (None: the batch)


def autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype)


def to_device(batch: dict, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and masks (B, C, H, W) as float on the device; compact uint8
    batches (see ``BoneDataset``) are converted there, after the cheap transfer."""
    images = batch["image"].to(ctx.device, non_blocking=True)
    masks = batch["mask"].to(ctx.device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = to_float_image(images)
        masks = to_float_mask(masks, ctx.soft_targets)
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    return images.contiguous(memory_format=fmt), masks


def past(deadline: float) -> bool:
    """Has any rank passed ``deadline`` (``time.monotonic()``)? Same answer on all ranks."""
    return not all_ranks_true(time.monotonic() <= deadline)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,  # timm scheduler with step_update(num_updates)
    loss_fn: nn.Module,
    ctx: StepContext,
    epoch: int,
    num_updates: int,
    image_names: Callable[[Sequence[int]], list[str]] = lambda idx: [str(i) for i in idx],
    deadline: float | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean losses, lr, img/s, updates done and
    the micro-batch in use.

    One update takes ``ctx.accum_steps`` loader batches, run as forwards of at most
    ``ctx.micro_batch`` images (the loader's batches when None), each loss weighted by its
    share of the update's images. Out of memory, the update is dropped and redone with
    half the micro-batch (kept for the rest of the run): the number of updates and the LR
    schedule do not change. A non-finite loss raises ``NonFiniteLossError`` before any
    weight is touched. Stops early at ``deadline`` (``time.monotonic()``), finishing the
    current update. The losses are ``loss`` (the total) and every named part ``loss_fn``
    returns (``loss_bce``, ``loss_dice``, ...), each averaged over the forwards.
    """
    model.train()
    sums: dict[str, float] = defaultdict(float, loss=0.0)
    seen, batches, t0 = 0, 0, time.monotonic()
    n_batches = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not ctx.progress)
    optimizer.zero_grad(set_to_none=True)
    pending: list[dict] = []
    largest = 0
    for b, batch in enumerate(bar):
        pending.append(batch)
        largest = max(largest, len(batch["index"]))
        last_of_update = (b + 1) % ctx.accum_steps == 0 or b + 1 == n_batches
        if not last_of_update:
            continue
        done = _update(model, pending, loss_fn, ctx, epoch, b + 1 - len(pending), image_names)
        pending = []
        _optimizer_step(model, optimizer, ctx)
        num_updates += 1
        scheduler.step_update(num_updates)
        if ctx.ema is not None:
            ctx.ema.update(_unwrap(model), step=num_updates)
        for loss, parts, n in done:
            seen += n
            batches += 1
            sums["loss"] += loss.item()
            for name, value in parts.items():
                sums[name] += value
        rate = seen / max(time.monotonic() - t0, 1e-9)
        bar.set_postfix(loss=f"{sums['loss'] / batches:.4f}", img_s=f"{rate:.1f}")
        if deadline is not None and past(deadline):
            break
    elapsed = time.monotonic() - t0
    out = {k: v / max(batches, 1) for k, v in sums.items()}
    out.update(
        lr=optimizer.param_groups[0]["lr"],
        img_s=seen / max(elapsed, 1e-9),
        train_time=elapsed,
        num_updates=num_updates,
        micro_batch=min(ctx.micro_batch or largest, largest),
    )
    return out


OOM_HINT_TRAIN = (
    "lower data.image_size, use a smaller model, or train with train.amp=true on a GPU "
    "with more memory"
)


def _update(
    model: nn.Module,
    batches: list[dict],
    loss_fn: nn.Module,
    ctx: StepContext,
    epoch: int,
    first: int,
    image_names: Callable[[Sequence[int]], list[str]],
) -> list[tuple[torch.Tensor, dict[str, float], int]]:
    """Forward and backward of one update's loader batches (``first`` is the index of the
    first); returns (loss, parts, images) per forward. Gradients are left for the step.

    Out of memory (not under torchrun, where every rank would have to agree), the partial
    gradients are dropped and the update is redone with half ``ctx.micro_batch``.
    """
    while True:
        failed = False
        try:
            return _accumulate(model, batches, loss_fn, ctx, epoch, first, image_names)
        except torch.OutOfMemoryError:
            if is_distributed():
                raise
            failed = True
        if failed:  # outside the except: its traceback no longer pins the step's tensors
            model.zero_grad(set_to_none=True)
            free_memory(ctx.device)
            size = ctx.micro_batch or max(len(b["index"]) for b in batches)
            ctx.micro_batch = halve(size, "train.micro_batch", OOM_HINT_TRAIN)
            tqdm.write(
                f"epoch {epoch}: out of memory with {size} images per forward; redoing the "
                f"update with train.micro_batch={ctx.micro_batch}"
            )


def _accumulate(
    model: nn.Module,
    batches: list[dict],
    loss_fn: nn.Module,
    ctx: StepContext,
    epoch: int,
    first: int,
    image_names: Callable[[Sequence[int]], list[str]],
) -> list[tuple[torch.Tensor, dict[str, float], int]]:
    sizes = [len(b["index"]) for b in batches]
    total, micro = sum(sizes), ctx.micro_batch
    # The loader's batches as they come, unless the micro-batch cuts them differently: then
    # the update is joined and re-cut (a CPU copy per update, so only when needed).
    if micro is None or (all(n == micro for n in sizes[:-1]) and sizes[-1] <= micro):
        chunks = [(first + i, b) for i, b in enumerate(batches)]
    else:
        whole = {k: torch.cat([b[k] for b in batches]) for k in ("image", "mask", "index")}
        starts = np.cumsum([len(b["index"]) for b in batches])
        chunks = [
            (first + int(np.searchsorted(starts, s.start, side="right")),
             {k: v[s] for k, v in whole.items()})
            for s in spans(total, micro)
        ]  # fmt: skip
    done = []
    for c, (b, chunk) in enumerate(chunks):
        images, masks = to_device(chunk, ctx)
        sync = (
            contextlib.nullcontext()
            if c + 1 == len(chunks) or not hasattr(model, "no_sync")
            else model.no_sync()
        )
        with sync:
            with autocast(ctx):
                logits = model(images)
            loss, parts = loss_fn(logits, masks)
            if not all_ranks_true(torch.isfinite(loss)):  # every rank stops together
                names = image_names(chunk["index"].tolist())
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, batch {b}; images: {names}"
                )
            scaled = loss * (images.shape[0] / total)  # its share of the update's images
            (ctx.scaler.scale(scaled) if ctx.scaler else scaled).backward()
        done.append((loss.detach(), parts, images.shape[0]))
    return done


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: StepContext) -> None:
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)
    if ctx.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under ``torch.compile`` and DDP (what EMA and checkpoints see)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class OOFWriter:
    """Out-of-fold probabilities, downsampled to ``size`` and stored as float16 rows."""

    def __init__(self, array: np.ndarray, row_of: dict[int, int], size: int) -> None:
        self.array, self.row_of, self.size = array, row_of, size

    def write(self, cache_index: int, probs: torch.Tensor) -> None:
        small = F.interpolate(probs[None].float(), size=(self.size, self.size), mode="area")[0]
        self.array[self.row_of[cache_index]] = small.half().cpu().numpy()


def _forward_chunked(model: nn.Module, images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Validation logits of a batch, in forwards of at most ``ctx.eval_micro_batch`` images
    (halved and redone on out of memory; the logits are the same)."""

    def forward(s: slice) -> torch.Tensor:
        with autocast(ctx):
            return model(images[s])

    logits, ctx.eval_micro_batch = run_chunked(
        forward, images.shape[0], ctx.eval_micro_batch, ctx.device, "train.micro_batch",
        OOM_HINT_TRAIN, tqdm.write,
    )  # fmt: skip
    return logits


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    truth: GroundTruth,
    loss_fn: nn.Module,
    ctx: StepContext,
    thresholds: float | Sequence[float] = 0.5,
    oof: OOFWriter | None = None,
) -> dict:
    """Loss at the model's resolution and the competition Dice at each image's source size.

    Returns ``val_loss``, ``dice`` (mean), ``per_class`` (array) and ``n_images``. Under
    DDP the Dice sums are reduced across ranks (each rank validates its own images).
    """
    model.eval()
    acc = DiceAccumulator(device=ctx.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    n_batches = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for batch in tqdm(loader, desc="validate", unit="batch", leave=False, disable=not ctx.progress):
        images, masks = to_device(batch, ctx)
        logits = _forward_chunked(model, images, ctx)
        loss_sum += loss_fn(logits, masks)[0].double()
        n_batches += 1
        for i, idx in enumerate(batch["index"].tolist()):
            x = logits[i].float()
            src_hw = truth.src_hw(idx)
            sparse = upsample_threshold(x, src_hw, thresholds)
            counts = overlap_counts(sparse.masks, truth_crops(truth.polygons(idx), src_hw))
            acc.update(*(torch.as_tensor(c, device=ctx.device) for c in counts))
            if oof is not None:
                oof.write(idx, torch.sigmoid(x))
    acc.all_reduce()
    all_reduce_sum(loss_sum, n_batches)
    table = acc.compute()
    return {
        "val_loss": float(loss_sum / n_batches.clamp(min=1)),
        "dice": table.mean if table.n_images else math.nan,
        "per_class": table.per_class,
        "n_images": table.n_images,
    }
