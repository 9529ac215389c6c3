"""The training step, one epoch of training, one pass of validation.

``train_step`` is the one place a training batch meets the loss and the optimiser:
training, the batch-size probe and the doctor all call it. ``train_one_epoch`` returns a
dict of the epoch's means; ``validate`` calls the loss the same way and returns a
``Validation`` (the registered metrics as a flat dict, and the per-class Dice table).

Validation scores the leaderboard's way: logits at the model's resolution are upsampled
exactly to each image's original size (2048) and thresholded sparsely, then compared with
the ground truth drawn exactly in each class's bounding box. Only counts are kept.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bonecomp.data.annotations import Polygons
from bonecomp.data.rasterize import truth_crops
from bonecomp.data.sample import IMAGE, INDEX, convert_fields
from bonecomp.distributed import all_ranks_true, all_reduce_max, all_reduce_sum, is_distributed
from bonecomp.inference.postprocess import overlap_counts, upsample_threshold
from bonecomp.inference.sliding import sliding_window
from bonecomp.memory import free_memory, halve, run_chunked, spans
from bonecomp.metrics import DiceAccumulator, DiceTable, compute_metrics


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the batch and its images."""


class TruthByIndex(Protocol):
    """Where validation finds each item's truth: its polygons and source (H, W).

    The training cache is one (``TrainCache``); any table of images and JSONs can be.
    """

    def polygons(self, i: int) -> Polygons: ...

    def src_hw(self, i: int) -> tuple[int, int]: ...


def _index_names(idx: Sequence[int]) -> list[str]:
    return [str(i) for i in idx]


@dataclass
class StepContext:
    """How a training step runs, besides model, data, loss and optimizer.

    ``oom_retry`` and ``check_finite`` are on for training; the batch-size probe and the
    doctor turn them off, since they measure out-of-memory errors and losses themselves.
    """

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
    # out of memory: halve micro_batch and redo the update (never under torchrun)
    oom_retry: bool = True
    # a NaN/inf loss raises NonFiniteLossError, every rank together (off: the loss is
    # returned as it is, and no rank waits for the others)
    check_finite: bool = True
    image_names: Callable[[Sequence[int]], list[str]] = _index_names  # for messages


def autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype)


def to_device(batch: Mapping, ctx: StepContext) -> dict:
    """The batch on the device: every tensor moved, other values kept as they are.

    Each field of the sample contract (``bonecomp.data.sample``) is then converted as it
    declares: compact uint8 ``image`` (B, H, W) and ``mask`` (B, C, H, W) become float
    there, after the cheap transfer (``ctx.soft_targets``: the mask holds coverage), a
    user field takes its ``device_dtype``. The model's input takes the memory format of
    ``ctx.channels_last``. Any other key a dataset adds reaches the loss unchanged.
    """
    out = {
        k: v.to(ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    out = convert_fields(out, ctx.soft_targets)
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    out[IMAGE] = out[IMAGE].contiguous(memory_format=fmt)
    return out


def batch_size(batch: Mapping) -> int:
    """Images in a batch (the length of its ``image``)."""
    return len(batch[IMAGE])


@dataclass
class Budget:
    """A time budget for training (``train.max_train_minutes``) that binds only when it must.

    While the projected finish fits the budget, the schedule's position is the number of
    updates done, exactly as without a budget. The projection is the time so far plus
    the remaining updates at the pace measured since this process's first update (so
    start-up, DataLoader workers, cold caches, compilation and the first kernels are not
    taken for the pace). Once it overruns, the clock takes over for the rest of the run:
    from its position ``p0`` at that moment ``t0`` the position moves linearly in time to
    ``total_updates`` at the deadline (never behind the updates), so a run cut by time
    still anneals to the schedule's floor instead of stopping mid-way.

    ``spent`` is the time of earlier processes of the run and ``takeover`` the
    ``(p0, t0)`` they recorded (``--resume``); both travel in ``last.pt``.
    """

    seconds: float
    total_updates: int
    spent: float = 0.0
    takeover: tuple[int, float] | None = None
    clock: Callable[[], float] = time.monotonic
    start: float = 0.0
    # (clock, updates) at this process's first update: where the pace is measured from
    _first: tuple[float, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.start = self.clock()
        if self.takeover is not None:
            self.takeover = (int(self.takeover[0]), float(self.takeover[1]))

    def elapsed(self) -> float:
        """Seconds of this run so far, the largest over ranks (same answer on all)."""
        return all_reduce_max(self.spent + self.clock() - self.start)[0]

    def position(self, num_updates: int) -> tuple[int, bool]:
        """(the schedule's position after ``num_updates`` updates, is the time up).

        Every rank gets the same answer (the elapsed time and the projection are the
        largest over ranks)."""
        now = self.clock()
        if self._first is None:
            self._first = (now, num_updates)
        first_at, first_n = self._first
        pace = (now - first_at) / (num_updates - first_n) if num_updates > first_n else 0.0
        mine = self.spent + now - self.start
        elapsed, projected = all_reduce_max(
            mine, mine + max(self.total_updates - num_updates, 0) * pace
        )
        out_of_time = elapsed >= self.seconds
        if self.takeover is None and (projected > self.seconds or out_of_time):
            self.takeover = (num_updates, elapsed)
        if self.takeover is None:
            return num_updates, False
        p0, t0 = self.takeover
        share = 1.0 if elapsed >= self.seconds else (elapsed - t0) / (self.seconds - t0)
        by_clock = math.ceil(p0 + (self.total_updates - p0) * min(max(share, 0.0), 1.0))
        return max(num_updates, min(by_clock, self.total_updates)), out_of_time


class LossFn(Protocol):
    """``loss_fn(logits, batch) -> (total, parts)``: ``batch`` as ``to_device`` gives it,
    ``parts`` the named floats to log (``loss_bce``, ...). See ``losses.build_loss``."""

    def __call__(
        self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


OOM_HINT_TRAIN = (
    "lower data.image_size, use a smaller model, or train with train.amp=true on a GPU "
    "with more memory"
)


def train_step(
    model: nn.Module,
    batches: Sequence[Mapping],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    ctx: StepContext,
    *,
    epoch: int = 0,
    first_batch: int = 0,
) -> dict[str, float]:
    """One optimiser update from ``batches``: forward, loss, backward, clip and step.

    ``batches`` are the loader batches of the update (``ctx.accum_steps`` of them in
    training), dicts as the dataset yields them; each is moved with ``to_device`` and the
    model sees ``batch["image"]``, the loss the whole batch. They are run as forwards of
    at most ``ctx.micro_batch`` images (as they come when None or when they already fit;
    else joined and re-cut, over every key), each loss weighted by its share of the
    update's images, under ``ctx.amp_dtype`` autocast and ``ctx.scaler`` loss scaling;
    the gradient norm is clipped to ``ctx.grad_clip``.

    With ``ctx.check_finite`` a NaN/inf loss raises ``NonFiniteLossError`` (naming the
    epoch, batch and images) before any weight is touched, on every rank together. With
    ``ctx.oom_retry`` (not under torchrun) an out-of-memory forward/backward drops the
    partial gradients and redoes the update with half ``ctx.micro_batch``, which is kept.
    ``epoch`` and ``first_batch`` (the loader index of ``batches[0]``) name the update in
    messages.

    Returns the mean over the forwards of ``loss`` (the total) and of each named part the
    loss returns, plus ``images`` and ``forwards`` (their counts).
    """
    optimizer.zero_grad(set_to_none=True)
    done = _backward(model, batches, loss_fn, ctx, epoch, first_batch)
    _optimizer_step(model, optimizer, ctx)
    out: dict[str, float] = defaultdict(float)
    for loss, parts, _ in done:
        out["loss"] += loss.item() / len(done)
        for name, value in parts.items():
            out[name] += value / len(done)
    return {**out, "images": sum(n for *_, n in done), "forwards": len(done)}


@dataclass
class Epoch:
    """Which pass ``train_one_epoch`` makes: its number, the updates done before it and
    the run's time budget (None: none)."""

    index: int
    num_updates: int = 0
    budget: Budget | None = None


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader | Sequence[Mapping],
    optimizer: torch.optim.Optimizer,
    scheduler,  # timm scheduler with step_update(num_updates)
    loss_fn: LossFn,
    ctx: StepContext,
    epoch: Epoch,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean losses, lr, img/s, updates done and
    the micro-batch in use.

    Every ``ctx.accum_steps`` loader batches make one ``train_step``; after each the LR
    schedule steps and the EMA (``ctx.ema``) takes the new weights. Out of memory the
    step halves the micro-batch and redoes the update, so the number of updates and the
    LR schedule do not change. With ``epoch.budget`` the schedule follows the clock once
    the projected finish overruns the budget (``Budget.position``; until then the updates,
    exactly) and the pass stops when the time is up, after the current update. The losses
    are ``loss`` (the total) and every named part ``loss_fn`` returns (``loss_bce``,
    ``loss_dice``, ...), each averaged over the forwards.
    """
    model.train()
    sums: dict[str, float] = defaultdict(float, loss=0.0)
    seen, forwards, t0 = 0, 0, time.monotonic()
    num_updates = epoch.num_updates
    n_batches = len(loader)
    bar = tqdm(
        loader, desc=f"epoch {epoch.index}", unit="batch", leave=False, disable=not ctx.progress
    )
    pending: list[Mapping] = []
    largest = 0
    for b, batch in enumerate(bar):
        pending.append(batch)
        largest = max(largest, batch_size(batch))
        if (b + 1) % ctx.accum_steps and b + 1 != n_batches:
            continue
        step = train_step(model, pending, optimizer, loss_fn, ctx, epoch=epoch.index,
                          first_batch=b + 1 - len(pending))  # fmt: skip
        pending = []
        num_updates += 1
        position, out_of_time = (num_updates, False)
        if epoch.budget is not None:
            position, out_of_time = epoch.budget.position(num_updates)
        scheduler.step_update(position)
        if ctx.ema is not None:
            ctx.ema.update(_unwrap(model), step=num_updates)
        n = step.pop("forwards")
        seen += step.pop("images")
        forwards += n
        for name, value in step.items():
            sums[name] += value * n
        rate = seen / max(time.monotonic() - t0, 1e-9)
        bar.set_postfix(loss=f"{sums['loss'] / forwards:.4f}", img_s=f"{rate:.1f}")
        if out_of_time:
            break
    elapsed = time.monotonic() - t0
    out = {k: v / max(forwards, 1) for k, v in sums.items()}
    out.update(
        lr=optimizer.param_groups[0]["lr"],
        img_s=seen / max(elapsed, 1e-9),
        train_time=elapsed,
        num_updates=num_updates,
        micro_batch=min(ctx.micro_batch or largest, largest),
    )
    return out


def _backward(
    model: nn.Module,
    batches: Sequence[Mapping],
    loss_fn: LossFn,
    ctx: StepContext,
    epoch: int,
    first: int,
) -> list[tuple[torch.Tensor, dict[str, float], int]]:
    """Forward and backward of one update's batches; returns (loss, parts, images) per
    forward. Gradients are left for the optimiser step.

    Out of memory (with ``ctx.oom_retry``, not under torchrun, where every rank would have
    to agree), the partial gradients are dropped and the update is redone with half
    ``ctx.micro_batch``.
    """
    while True:
        failed = False
        try:
            return _accumulate(model, batches, loss_fn, ctx, epoch, first)
        except torch.OutOfMemoryError:
            if not ctx.oom_retry or is_distributed():
                raise
            failed = True
        if failed:  # outside the except: its traceback no longer pins the step's tensors
            model.zero_grad(set_to_none=True)
            free_memory(ctx.device)
            size = ctx.micro_batch or max(batch_size(b) for b in batches)
            ctx.micro_batch = halve(size, "train.micro_batch", OOM_HINT_TRAIN)
            tqdm.write(
                f"epoch {epoch}: out of memory with {size} images per forward; redoing the "
                f"update with train.micro_batch={ctx.micro_batch}"
            )


def _join(batches: Sequence[Mapping]) -> dict:
    """One batch of all: tensors concatenated on dim 0, lists chained, per key."""
    out = {}
    for k, first in batches[0].items():
        values = [b[k] for b in batches]
        if isinstance(first, torch.Tensor):
            out[k] = torch.cat(values)
        elif isinstance(first, list | tuple):
            out[k] = [x for v in values for x in v]
        else:
            raise TypeError(
                f"batch key {k!r}: cannot re-cut a {type(first).__name__} into micro-batches "
                "(a dataset key must be a tensor or a list with one item per image)"
            )
    return out


def _chunks(batches: Sequence[Mapping], micro: int | None, first: int) -> list[tuple[int, dict]]:
    """(loader index, batch) per forward: the loader's batches as they come, unless the
    micro-batch cuts them differently: then the update is joined and re-cut (a CPU copy
    per update, so only when needed)."""
    sizes = [batch_size(b) for b in batches]
    if micro is None or (all(n == micro for n in sizes[:-1]) and sizes[-1] <= micro):
        return [(first + i, b) for i, b in enumerate(batches)]
    whole = _join(batches)
    starts = np.cumsum(sizes)
    return [
        (first + int(np.searchsorted(starts, s.start, side="right")),
         {k: v[s] for k, v in whole.items()})
        for s in spans(sum(sizes), micro)
    ]  # fmt: skip


def _accumulate(
    model: nn.Module,
    batches: Sequence[Mapping],
    loss_fn: LossFn,
    ctx: StepContext,
    epoch: int,
    first: int,
) -> list[tuple[torch.Tensor, dict[str, float], int]]:
    total = sum(batch_size(b) for b in batches)
    chunks = _chunks(batches, ctx.micro_batch, first)
    done = []
    for c, (b, chunk) in enumerate(chunks):
        on_device = to_device(chunk, ctx)
        n = batch_size(on_device)
        sync = (
            contextlib.nullcontext()
            if c + 1 == len(chunks) or not hasattr(model, "no_sync")
            else model.no_sync()
        )
        with sync:
            with autocast(ctx):
                logits = model(on_device[IMAGE])
            loss, parts = loss_fn(logits, on_device)
            if ctx.check_finite and not all_ranks_true(torch.isfinite(loss)):
                names = ctx.image_names(_indices(chunk))  # every rank stops together
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, batch {b}; images: {names}"
                )
            scaled = loss * (n / total)  # its share of the update's images
            (ctx.scaler.scale(scaled) if ctx.scaler else scaled).backward()
        done.append((loss.detach(), parts, n))
    return done


def _indices(batch: Mapping) -> list[int]:
    """The batch's cache indices (``index``), for messages; positions when it has none."""
    index = batch.get(INDEX)
    if index is None:
        return list(range(batch_size(batch)))
    return index.tolist() if isinstance(index, torch.Tensor) else list(index)


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


@dataclass
class Validation:
    """What ``validate`` returns: the metrics and the per-class Dice table."""

    metrics: dict[str, float]  # every registered metric (``metrics.METRICS``): loss, dice, ...
    table: DiceTable  # competition Dice per class and n_images (logs, best.pt, csv)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    truth: TruthByIndex,
    loss_fn: LossFn,
    ctx: StepContext,
    thresholds: float | Sequence[float] = 0.5,
    oof: OOFWriter | None = None,
    window: int | None = None,
    overlap: float = 0.25,
) -> Validation:
    """Loss at the model's resolution and the competition Dice at each image's source size.

    ``window``: a model trained on patches of that side (``data.patch_size``) sees the
    whole image as Gaussian-blended windows of it (``inference.sliding``, ``overlap``), as
    inference runs it. The loss is called as in training, ``loss_fn(logits, batch)``.
    ``metrics`` holds
    every function of ``metrics.METRICS`` of the pass (``loss``, ``dice``: the mean
    competition Dice, and any registered one), a flat dict of floats. Under DDP the sums
    are reduced across ranks (each rank validates its own images).
    """
    model.eval()
    acc = DiceAccumulator(device=ctx.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    n_batches = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for batch in tqdm(loader, desc="validate", unit="batch", leave=False, disable=not ctx.progress):
        on_device = to_device(batch, ctx)
        logits = sliding_window(
            lambda x: _forward_chunked(model, x, ctx), on_device[IMAGE], window or 1 << 30,
            overlap,
        )  # fmt: skip
        loss_sum += loss_fn(logits, on_device)[0].double()
        n_batches += 1
        for i, idx in enumerate(_indices(batch)):
            x = logits[i].float()
            src_hw = truth.src_hw(idx)
            sparse = upsample_threshold(x, src_hw, thresholds)
            counts = overlap_counts(sparse.masks, truth_crops(truth.polygons(idx), src_hw))
            acc.update(*(torch.as_tensor(c, device=ctx.device) for c in counts))
            if oof is not None:
                oof.write(idx, torch.sigmoid(x))
    acc.all_reduce()
    all_reduce_sum(loss_sum, n_batches)
    scores = acc.scores(float(loss_sum / n_batches.clamp(min=1)))
    return Validation(compute_metrics(scores), scores.table)
