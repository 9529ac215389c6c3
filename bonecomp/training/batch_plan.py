"""Fitting the batch to the device: ``train.micro_batch`` -> images per forward.

``null`` keeps the loader's batch, an int fixes it, ``auto`` measures one training step
(``engine.train_step``: forward, backward, optimiser step, with AMP and channels_last as
training uses them) of the real model at the recipe's input size, keeping the largest
micro-batch whose peak stays under ``train.memory_fraction`` of the device. On a GPU the
computed plan (``bonecomp.plan``: the same step on fake tensors) proposes the size first:
the probe measures it and halves only if it does not fit (one step where the plan is
right); without a plan (it failed, or a fake device in the tests) the probe grows 1, 2,
4, ... images up to ``train.batch_size``. The effective batch (``batch_size x
accum_steps`` per update) never changes: a smaller micro-batch means more forwards per
update. The probe leaves the weights and the random streams of training as they were; on
CPU there is nothing to measure and ``auto`` is the full batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from bonecomp.config import Config, LossConfig
from bonecomp.data.sample import Sample, collate
from bonecomp.distributed import all_reduce_min
from bonecomp.engine import LossFn, StepContext, train_step
from bonecomp.fileio import write_text
from bonecomp.losses import build_loss
from bonecomp.memory import BatchMemoryError, MemoryMeter, free_memory
from bonecomp.runs import RunDir
from bonecomp.training.data import train_sample

Collate = Callable[[list[Mapping]], Mapping]

GiB = 2**30


@dataclass
class BatchPlan:
    """The micro-batch training will use, and why."""

    micro_batch: int
    batch_size: int
    accum_steps: int
    forwards_per_update: int
    effective_batch: int
    device: str
    how: str  # "probe", "cpu" (no probe), "config"
    memory_fraction: float | None = None
    planned: int | None = None  # the computed plan's micro-batch the probe started from
    total_bytes: int | None = None
    peak_bytes: dict[int, int | None] = field(default_factory=dict)  # None: out of memory

    def describe(self) -> str:
        head = (
            f"batch plan: micro-batch {self.micro_batch} x {self.forwards_per_update} "
            f"forwards per update = effective batch {self.effective_batch} "
            f"(train.batch_size={self.batch_size} x train.accum_steps={self.accum_steps})"
        )
        if self.how == "cpu":
            return (
                head + "; train.micro_batch=auto on CPU: no probe, the full batch "
                "(scripts/doctor.py --plan computes a GPU's)"
            )
        if self.planned is not None:
            head += f"; computed plan: {self.planned}"
        if not self.peak_bytes:
            return head
        peaks = ", ".join(
            f"{m}: {'OOM' if p is None else f'{p / GiB:.2f} GiB'}"
            for m, p in self.peak_bytes.items()
        )
        limit = (self.total_bytes or 0) * (self.memory_fraction or 0) / GiB
        return f"{head}; peak per micro-batch {{{peaks}}}, limit {limit:.2f} GiB"

    def to_json(self) -> str:
        d = asdict(self)
        d["peak_bytes"] = {str(k): v for k, v in self.peak_bytes.items()}
        return json.dumps(d, indent=2) + "\n"


def plan_batch(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: StepContext,
    meter: MemoryMeter | None,
    loss_fn: LossFn | None = None,
    sample: Callable[[], Mapping] | None = None,
    collate_fn: Collate | None = None,
    planner: Callable[[int], int] | None = None,
) -> BatchPlan:
    """The micro-batch for ``cfg``: from the config, or probed on ``meter``'s device.

    ``planner(budget_bytes)`` gives the computed plan's largest micro-batch within the
    budget (``bonecomp.plan.planned_micro_batch``; training passes it on a GPU): the
    probe starts there. A planner that fails is reported and the probe grows from 1.

    ``model`` is the bare model (not DDP-wrapped) and ``optimizer`` its optimiser, which
    must not have stepped yet (the probe uses a fresh one of the same kind). ``sample()``
    gives one training item as the dataset yields it and ``collate_fn`` batches items as
    the loader does: the probe's batches repeat it, so a loss term that reads a key the
    dataset adds finds it. When None, the item is a random one made through the
    training contract (``training.data.train_sample``: the recipe's input side and the
    fields its loss reads). Under torchrun the ranks agree on the smallest micro-batch.
    """
    t = cfg.train
    how, peaks, total, planned = "config", {}, None, None
    if t.micro_batch == "auto" and meter is None:
        micro, how = t.batch_size, "cpu"
    elif t.micro_batch == "auto":
        how, total = "probe", meter.total()
        side = cfg.data.patch_size or cfg.data.image_size  # what one training input holds
        if sample is None:
            contract = train_sample(cfg)
            sample = partial(contract.synthetic, side, ctx.soft_targets)
            collate_fn = contract.collate
        limit = int(t.memory_fraction * total)
        planned = _planned(planner, limit, t.batch_size)
        peaks = probe(model, optimizer, ctx, side, t.batch_size, meter, loss_fn,
                      limit=limit, sample=sample, collate_fn=collate_fn,
                      start=planned)  # fmt: skip
        fits = [m for m, p in peaks.items() if p is not None and p <= t.memory_fraction * total]
        if not fits and peaks[min(peaks)] is None:  # out of memory at the fewest images
            key = "data.image_size" if cfg.data.patch_size is None else "data.patch_size"
            raise BatchMemoryError(
                f"out of memory with one {side} px image per forward "
                f"(train.micro_batch=auto); lower {key} or use a smaller model"
            )
        micro = max(fits, default=1)  # 1 over the margin but not out of memory: try it
    else:
        micro = min(t.micro_batch or t.batch_size, t.batch_size)
    micro = all_reduce_min(micro)
    return BatchPlan(
        micro_batch=micro,
        batch_size=t.batch_size,
        accum_steps=t.accum_steps,
        forwards_per_update=math.ceil(t.batch_size * t.accum_steps / micro),
        effective_batch=t.batch_size * t.accum_steps,
        device=str(ctx.device),
        how=how,
        memory_fraction=t.memory_fraction if how == "probe" else None,
        total_bytes=total,
        peak_bytes=peaks,
        planned=planned,
    )


def batch_planner(cfg: Config, ctx: StepContext) -> Callable[[int], int] | None:
    """On a GPU with ``train.micro_batch: auto``: the computed plan's micro-batch within a
    budget (``bonecomp.plan.planned_micro_batch``; the budget leaves room for cuDNN's
    workspace, which the probe's ``max_memory_allocated`` includes and the plan does not)."""
    if cfg.train.micro_batch != "auto" or ctx.device.type != "cuda":
        return None

    def planner(limit: int) -> int:
        from bonecomp.plan import FRAMEWORK, planned_micro_batch

        return planned_micro_batch(cfg, limit - FRAMEWORK.workspace, ctx.amp_dtype)

    return planner


def _planned(planner: Callable[[int], int] | None, limit: int, batch_size: int) -> int | None:
    """The plan's micro-batch under ``limit`` (at least 1, at most the batch), or None."""
    if planner is None:
        return None
    try:
        planned = planner(limit)
    except Exception as e:  # the plan only saves probes: never a reason to stop
        print(f"batch plan: the computed plan failed ({type(e).__name__}: {e}); probing from 1")
        return None
    return min(max(planned, 1), batch_size)


def save_plan(plan: BatchPlan, run: RunDir) -> None:
    write_text(run.batch_plan, plan.to_json())


def probe_sizes(batch_size: int, start: int | None = None) -> list[int]:
    """1, 2, 4, ... below ``batch_size``, then ``batch_size`` itself; from a planned
    ``start``: ``start`` and its halves down to 1 (the probe stops at the first that fits)."""
    if start is not None:
        return [start >> k for k in range(start.bit_length())]
    sizes = [1 << k for k in range(batch_size.bit_length()) if 1 << k < batch_size]
    return [*sizes, batch_size]


def probe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: StepContext,
    image_size: int,
    batch_size: int,
    meter: MemoryMeter,
    loss_fn: LossFn | None = None,
    limit: int | None = None,
    sample: Callable[[], Mapping] | None = None,
    collate_fn: Collate | None = None,
    start: int | None = None,
) -> dict[int, int | None]:
    """Peak bytes of one training step (``engine.train_step`` on a uint8 batch as the
    loader gives it) per micro-batch size (None: out of memory), growing until one runs
    out of memory or passes ``limit``; from a planned ``start``, halving from it until
    one fits. The batches repeat ``sample()`` (default: a random whole image of
    ``image_size`` through the built-in contract), collated by ``collate_fn`` (default:
    ``sample.collate``).

    Runs on ``model`` itself with a fresh optimiser of ``optimizer``'s kind and no grad
    scaler (so every step allocates the optimiser's state), then puts the weights, buffers
    and every random generator back as they were. The step's out-of-memory retry is off:
    the probe measures the error.
    """
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    was_training = model.training
    scratch = _fresh_like(optimizer, model)
    loss_fn = loss_fn or build_loss(LossConfig(terms={"bce": 1.0}))
    # No grad scaler: the probe measures memory, and a scaler's skipped (overflowing) fp16
    # step would never allocate the optimiser's moments, so the peak would read low.
    step_ctx = dataclasses.replace(
        ctx,
        micro_batch=None,
        ema=None,
        progress=False,
        oom_retry=False,
        check_finite=False,
        scaler=None,
    )
    peaks: dict[int, int | None] = {}
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _python_rngs_kept(), meter.watch(model):
            # a training item's augmentation draws too
            item = sample() if sample else Sample().synthetic(image_size, ctx.soft_targets)
            model.train()
            for m in probe_sizes(batch_size, start):
                meter.reset()
                failed = False
                try:
                    batch = (collate_fn or collate)([item] * m)
                    train_step(model, [batch], scratch, loss_fn, step_ctx)
                    del batch
                    peaks[m] = meter.peak()
                except torch.OutOfMemoryError:
                    failed = True
                scratch.zero_grad(set_to_none=True)
                if failed:
                    peaks[m] = None
                    free_memory(ctx.device)
                    if start is None:
                        break
                    continue
                over = limit is not None and peaks[m] > limit
                if over == (start is None):  # growing: stop over the limit; halving: at a fit
                    break
    finally:
        del scratch
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        free_memory(ctx.device)
    return peaks


@contextlib.contextmanager
def _python_rngs_kept() -> Iterator[None]:
    """Python's and numpy's global generators as they were afterwards (augmentations
    draw from them; the training run's stream must not depend on the probe)."""
    py, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)  # noqa: NPY002


def _fresh_like(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimiser of ``optimizer``'s kind and settings over ``model``'s parameters
    (same state size per parameter, so the same memory)."""
    kind = type(optimizer)
    accepted = inspect.signature(kind.__init__).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return kind(model.parameters(), **settings)
