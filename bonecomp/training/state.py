"""What training carries from update to update, how it is built, saved and resumed.

``build_state`` makes the model, optimiser, schedule, grad scaler and EMA from the
config; ``save_last`` / ``load_last`` write and restore all of it with the RNG states, so
a resumed run continues as if never stopped (minus the epoch in progress).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from bonecomp import distributed
from bonecomp.checkpoint import (
    CheckpointError,
    init_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)  # fmt: skip
from bonecomp.classes import CLASSES
from bonecomp.config import Config, config_from_saved, resume_may_change, to_dict
from bonecomp.device import amp_dtype, resolve_channels_last
from bonecomp.distributed import Dist
from bonecomp.engine import StepContext, Validation
from bonecomp.fileio import atomic_write
from bonecomp.models import create_model
from bonecomp.models.checkpointing import set_grad_checkpointing
from bonecomp.optim import build_optimizer, build_scheduler
from bonecomp.runs import RunDir, RunError
from bonecomp.training.average import Averager, check_pool

# Keys (or sections) that may change when resuming: declared ``json_schema_extra=RESUME`` on the
# key in bonecomp/config.py (they do not alter what the run computes, or only say where
# files live: a run folder may be moved or copied).
RESUME_MAY_CHANGE = frozenset(resume_may_change())


@dataclass
class Progress:
    """Where the run stands; saved in ``last.pt``."""

    epoch: int = -1  # last finished epoch
    num_updates: int = 0
    best_dice: float = -1.0
    best_epoch: int = -1
    train_seconds: float = 0.0  # spent by the processes of the run so far (time budget)
    # (update, elapsed seconds) where the time budget's clock took over the schedule
    budget_takeover: tuple[int, float] | None = None
    cut: str = ""  # why this process stopped before the last epoch (``cut_note``)


@dataclass
class TrainState:
    """Model and optimisation state of one fold."""

    model: nn.Module  # the bare model (what checkpoints hold)
    train_model: nn.Module  # the model wrapped for DDP, or the same
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler: step_update(num_updates), step(epoch, metric)
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    ctx: StepContext
    average: Averager | None = None  # train.average: what averaged.pt is made of

    @property
    def eval_model(self) -> nn.Module:
        """What validation and ``best.pt`` use: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's and Python's global generators (libraries draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def build_state(
    cfg: Config, device: torch.device, dd: Dist, updates_per_epoch: int, progress: bool
) -> TrainState:
    """Model, optimiser, schedule, scaler and EMA as the config says, on ``device``.

    The same seed on every rank gives the same initial weights, so each rank's EMA copy
    starts from what DDP broadcasts; data randomness then differs by rank.
    """
    t = cfg.train
    seed_everything(t.seed)
    init = init_checkpoint(cfg)  # train.init_from: another run's weights, nothing else
    if init is None:
        model = create_model(cfg.model)
    else:  # no download of encoder weights the checkpoint's replace
        model = create_model(cfg.model.model_copy(update={"encoder_weights": None}))
        load_weights(model, init["model"], t.init_from)
    model = model.to(device)
    seed_everything(t.seed + dd.rank)
    dtype = amp_dtype(device, t.amp)
    channels_last = resolve_channels_last(t.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema) if t.ema else None
    if t.grad_checkpointing:  # after the EMA's copy, which only runs forwards
        set_grad_checkpointing(model)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, updates_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    train_model = model
    if dd.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:  # checkpoints keep saving ``model``, the bare module (no ``_orig_mod.``)
        train_model = torch.compile(train_model)
    ctx = StepContext(
        device,
        dtype,
        scaler,
        t.accum_steps,
        t.grad_clip,
        channels_last,
        ema,
        progress,
        cfg.data.soft_targets,
    )
    average = Averager.build(t.average, t.epochs, t.max_train_minutes is not None)
    return TrainState(model, train_model, optimizer, scheduler, scaler, ema, ctx, average)


def updates_per_epoch(batches: int, accum_steps: int) -> int:
    return math.ceil(batches / accum_steps)


# ----------------------------------------------------------------------------- resume
def check_resumable(cfg: Config, run: RunDir) -> None:
    """Refuse to resume with a config that changes the run (the LR schedule, the data,
    the model...): the checkpoint's optimizer and schedule would silently disagree."""
    if not run.last.is_file():
        raise RunError(f"{run}: nothing to resume (no {run.last.name}); start without --resume")
    ckpt = load_checkpoint(run.last)
    saved = to_dict(config_from_saved(ckpt["config"], str(run.last)))
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not _may_change(k))  # fmt: skip
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise RunError(
            f"cannot resume {run} with a different config ({diffs}); resume with the "
            f"saved one ({run.config}) or start a new train.experiment"
        )
    check_pool(ckpt.get("average"), run)


def check_fresh(run: RunDir) -> None:
    """A new run must not overwrite a finished or interrupted one."""
    if run.last.exists():
        raise RunError(
            f"{run} already holds a run; pass --resume to continue it, or choose another "
            "train.experiment / delete the folder"
        )


def load_last(state: TrainState, run: RunDir, device: torch.device) -> Progress:
    """Restore ``last.pt`` into ``state``; the best score comes from ``best.pt`` itself
    (a kill while ``last.pt`` was being saved must not let a worse model replace it).

    Under torchrun rank 0 reads both files and sends them to the other ranks, which
    never open the run folder (on another node it is not there)."""

    def read() -> tuple[dict, tuple[float, int] | None]:
        ckpt = load_checkpoint(run.last, "cpu")
        best = None
        if run.best.is_file():
            try:
                b = load_checkpoint(run.best)
            except CheckpointError as e:  # the run goes on without it: deleting is the way
                raise CheckpointError(
                    f"{run.best}: {e.reason}; delete it and resume: the next validation "
                    "writes a new best.pt (its out-of-fold maps with it)"
                ) from None
            best = float(b["metric"]), int(b["epoch"])
        return ckpt, best

    got = distributed.run_agreed(read, (CheckpointError,), on=distributed.is_rank0())
    ckpt, best = distributed.broadcast_object(got)
    load_weights(state.model, ckpt["model"], run.last)
    state.optimizer.load_state_dict(ckpt["optimizer"])  # moved to the parameters' device
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None and ckpt.get("ema"):
        state.ema.load_state_dict(ckpt["ema"])
    if state.average is not None:
        state.average.load_state_dict(ckpt.get("average"))
    set_rng_state(ckpt["rng"])
    saved = ckpt.get("progress", ckpt)  # checkpoints before 0.2 kept these at the top
    progress = Progress(**{k: saved.get(k, v) for k, v in asdict(Progress()).items()})
    # the best score is best.pt's; without best.pt (deleted) the next validation is best
    progress.best_dice, progress.best_epoch = best if best is not None else (-1.0, -1)
    return progress


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters, in order (not its buffers: under DDP each rank
    keeps its own BatchNorm statistics); equal on every rank of a synchronised job."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- saving
def _meta(cfg: Config, fold: int, epoch: int) -> dict:
    return {
        "config": to_dict(cfg),
        "classes": list(CLASSES),
        "fold": fold,
        "input_size": cfg.data.image_size,
        "patch_size": cfg.data.patch_size,  # None: whole images (inference's geometry)
        "epoch": epoch,
    }


def save_best(
    run: RunDir, cfg: Config, fold: int, epoch: int, model: nn.Module, val: Validation
) -> None:
    """``best.pt`` (weights only, self-describing) and the per-class Dice of that epoch."""
    save_checkpoint(
        run.best,
        {
            **_meta(cfg, fold, epoch),
            "model": model.state_dict(),
            "metric": val.metrics["dice"],
            "per_class": [float(v) for v in val.table.per_class],
        },
    )
    with atomic_write(run.dice_csv) as f:
        val.table.to_frame().to_csv(f, index=False)


def save_averaged(
    run: RunDir, cfg: Config, fold: int, model: nn.Module, val: Validation, how: dict
) -> None:
    """``averaged.pt`` (self-describing like ``best.pt``; ``averaged`` says which epochs
    and how) and its per-class Dice in ``dice_per_class_averaged.csv``."""
    save_checkpoint(
        run.averaged,
        {
            **_meta(cfg, fold, max(how["epochs"])),
            "model": model.state_dict(),
            "metric": val.metrics["dice"],
            "per_class": [float(v) for v in val.table.per_class],
            "averaged": how,
        },
    )
    with atomic_write(run.averaged_dice_csv) as f:
        val.table.to_frame().to_csv(f, index=False)


def save_last(run: RunDir, cfg: Config, fold: int, state: TrainState, progress: Progress) -> None:
    """``last.pt``: everything needed to resume after ``progress.epoch``."""
    save_checkpoint(
        run.last,
        {
            **_meta(cfg, fold, progress.epoch),
            "progress": asdict(progress),
            "metric": progress.best_dice,
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "ema": state.ema.state_dict() if state.ema is not None else None,
            "average": state.average.state_dict() if state.average is not None else None,
            "rng": rng_state(),
        },
    )


def rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out
