"""Train one fold: the orchestration over the builders of this package.

check config -> find data -> lock the run folder -> folds + cache -> loaders
-> model/optimiser/schedule/EMA -> (resume) -> epochs of train and validate, with the
extras (summary and trackers, checkpoints, OOF maps, averaging) as epoch hooks
(``bonecomp.training.hooks``)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from bonecomp import distributed
from bonecomp.checkpoint import CheckpointError
from bonecomp.checks import check_config
from bonecomp.config import Config, ConfigError, save_config
from bonecomp.data.folds import check_patients
from bonecomp.data.layout import discover
from bonecomp.data.pseudo_dir import PseudoSet
from bonecomp.device import pick_device
from bonecomp.distributed import Dist, run_agreed, where
from bonecomp.engine import Budget, Epoch, LossFn, train_one_epoch, validate
from bonecomp.fileio import OutputError, remove_stale_temps
from bonecomp.losses import build_loss
from bonecomp.memory import device_meter
from bonecomp.runs import RunDir, RunError, run_dir
from bonecomp.training.average import clear_pool
from bonecomp.training.batch_plan import batch_planner, plan_batch, save_plan
from bonecomp.training.data import (
    DATA_ERRORS,
    FoldData,
    build_loaders,
    fold_split,
    open_pseudo_labels,
    prepare_cache,
)
from bonecomp.training.hooks import (
    AveragingHook,
    CheckpointHook,
    EpochHook,
    EpochRecord,
    OOFHook,
    TrackingHook,
)
from bonecomp.training.records import SummaryLog, discard_staged_oof, settle_oof
from bonecomp.training.state import (
    Progress,
    TrainState,
    build_state,
    check_fresh,
    check_resumable,
    load_last,
    updates_per_epoch,
    weights_digest,
)

_log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    best_epoch: int
    epochs_done: int
    epochs_planned: int = 0
    cut: str = ""  # why training stopped before its last epoch ("" when it did not)
    averaged_dice: float | None = None  # train.average: val Dice of averaged.pt

    def warning(self, fold: int, expect_dice: float | None) -> str | None:
        """One line when a cut run ended below what its recipe should reach, with what
        to do; None otherwise."""
        if not self.cut or expect_dice is None or self.best_dice >= expect_dice:
            return None
        return (
            f"fold {fold} was {self.cut} and reached val Dice "
            f"{self.best_dice:.4f}, below the {expect_dice} this recipe should reach "
            "(train.expect_dice): this model is undertrained; train the whole schedule "
            "with train.max_train_minutes=null, or use a smaller recipe (fewer epochs, "
            "smaller data.image_size)"
        )


def cut_note(minutes: float, epochs_done: int, epochs: int) -> str:
    """How a run cut by its time budget is described (console, summary.csv, report)."""
    return f"cut by train.max_train_minutes={minutes:g} after {epochs_done} of {epochs} epochs"


def takeover_note(minutes: float, update: int, seconds: float) -> str:
    """The console line for the moment the time budget's clock takes over the schedule."""
    return (
        f"train.max_train_minutes={minutes:g}: the projected finish overran the budget at "
        f"update {update} ({seconds / 60:.1f} min in); from there the learning rate "
        "schedule follows the clock to reach its floor by the deadline"
    )


def run_training(
    cfg: Config,
    fold: int,
    resume: bool = False,
    progress: bool = True,
    on_best: Callable[[RunDir], None] | None = None,
    on_end: Callable[[RunDir], Path | None] | None = None,
    hooks: Sequence[EpochHook] = (),
) -> TrainResult:
    """Train ``fold`` of ``cfg``; ``resume`` continues from the run's ``last.pt``.

    Problems come in the order a user can act on them: config, then data, then the run
    folder (held by another process, already trained, not resumable). ``on_best(run)`` is
    called on rank 0 after each new best epoch is saved; ``on_end(run)`` on rank 0 after
    the last epoch, before the trackers finish: the file it returns (the report) is
    logged to them as an artifact. ``hooks`` are called on every rank after the run's own
    (``bonecomp.training.hooks``).
    """
    check_config(cfg)
    if not 0 <= fold < cfg.data.n_splits:
        raise ConfigError(f"fold {fold} out of range for data.n_splits={cfg.data.n_splits}")
    dd = distributed.setup(cfg.train.device, cfg.train.dist_timeout)
    device = _device(cfg.train.device, dd)

    def find_data() -> tuple[pd.DataFrame, PseudoSet | None]:  # each node reads its own copy
        table = discover(cfg.data.root, "train", cfg.data.exclude)
        check_patients(table, cfg.data.n_splits)  # not after the cache build
        return table, open_pseudo_labels(cfg, table)  # the user's data: before the run

    table, pseudo = run_agreed(find_data, DATA_ERRORS)  # a problem on one node ends all
    run = run_dir(cfg, fold)
    with contextlib.ExitStack() as held:

        def claim() -> None:  # on rank 0; every rank learns whether it worked
            held.enter_context(run.lock())
            check_resumable(cfg, run) if resume else check_fresh(run)
            if not resume:
                clear_pool(run)  # of an earlier run killed before its first last.pt
            remove_stale_temps(run.path)  # half-written files of a killed process

        # only rank 0 opens the run folder; a refusal ends every rank with its message
        run_agreed(claim, (RunError, OutputError, CheckpointError, ConfigError), on=dd.main)
        folds, cache = prepare_cache(cfg, table, dd, progress and dd.main)
        train_idx, val_idx = fold_split(folds, fold)
        data = build_loaders(cfg, cache, train_idx, val_idx, dd, device.type == "cuda", pseudo)
        per_epoch = updates_per_epoch(len(data.train_loader), cfg.train.accum_steps)
        state = build_state(cfg, device, dd, per_epoch, progress and dd.main)
        # before load_last: the probe needs an optimiser that has not stepped
        loss_fn = build_loss(cfg.loss)
        plan = plan_batch(cfg, state.model, state.optimizer, state.ctx, device_meter(device),
                          loss_fn, sample=lambda: data.train_loader.dataset[0],
                          collate_fn=data.train_loader.collate_fn,
                          planner=batch_planner(cfg, state.ctx))  # fmt: skip
        state.ctx.micro_batch = None if cfg.train.micro_batch is None else plan.micro_batch
        start = load_last(state, run, device) if resume else Progress()
        if dd.main and state.average is not None:
            state.average.after_save(run)  # pool files of the lost epoch go
        if dd.main:
            run.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run.config)
            if cfg.train.micro_batch == "auto":
                save_plan(plan, run)
                tqdm.write(plan.describe())
            if resume:
                tqdm.write(f"resumed {run} after epoch {start.epoch} (best {start.best_dice:.4f})")
                settled = settle_oof(run, start.best_epoch)  # before any new validation
                if settled:
                    tqdm.write(settled)
        log = SummaryLog(cfg, run, start.epoch if resume else -1) if dd.main else None
        state.ctx.image_names = data.image_names  # the non-finite message names images
        averaging = AveragingHook(state.average) if state.average is not None else None
        own = [
            TrackingHook(log) if log is not None else None, CheckpointHook(),
            OOFHook() if cfg.train.save_oof else None, averaging,
        ]  # fmt: skip
        fold_run = FoldRun(
            cfg=cfg, fold=fold, run=run, data=data, state=state, loss_fn=loss_fn, dd=dd,
            hooks=[h for h in own if h is not None] + list(hooks),
            progress=progress and dd.main, on_best=on_best,
        )  # fmt: skip
        ok = False
        try:
            prog = _epochs(fold_run, start)
            for hook in fold_run.hooks:
                hook.on_train_end(fold_run, prog)
            averaged_dice = averaging.dice if averaging is not None else None
            if log is not None:
                log.final(run, on_end(run) if on_end is not None else None)
            ok = True
        finally:  # the trackers' runs are closed (as failed) even when training fails
            if log is not None:
                log.close(ok)
            if dd.main:
                discard_staged_oof(run)
        if _log.isEnabledFor(logging.DEBUG):  # --debug: the ranks' weights must agree
            _log.debug("%s: weights sha256 %s", where(), weights_digest(state.model))
    return TrainResult(
        run.path, prog.best_dice, prog.best_epoch, prog.epoch + 1, cfg.train.epochs, prog.cut,
        averaged_dice,
    )  # fmt: skip


@dataclass
class FoldRun:
    """What the epoch loop of one fold works with (built by ``run_training``)."""

    cfg: Config
    fold: int
    run: RunDir
    data: FoldData
    state: TrainState
    loss_fn: LossFn
    dd: Dist
    hooks: list[EpochHook]  # in order: see bonecomp.training.hooks
    progress: bool = True
    on_best: Callable[[RunDir], None] | None = None  # rank 0, after a new best.pt


def _epochs(f: FoldRun, prog: Progress) -> Progress:
    """The epoch loop: train, validate every ``val_every`` epochs (and after the last, or
    when the time budget is spent), and call ``f.hooks`` at each point of the epoch.

    The summary row takes every key of the training pass and every validation metric,
    prefixed ``val_`` (``val_loss``, ``val_dice``, ...).
    """
    cfg, run, state, data, dd = f.cfg, f.run, f.state, f.data, f.dd
    t = cfg.train
    budget, prog.cut = None, ""
    if t.max_train_minutes:
        total = t.epochs * updates_per_epoch(len(data.train_loader), t.accum_steps)
        budget = Budget(
            60 * t.max_train_minutes, total, spent=prog.train_seconds,
            takeover=prog.budget_takeover,
        )  # fmt: skip
    start = time.monotonic()
    say = tqdm.write if dd.main else (lambda *_: None)
    bar = tqdm(
        range(prog.epoch + 1, t.epochs), desc=f"fold {f.fold}", unit="epoch",
        disable=not f.progress,
    )  # fmt: skip
    for epoch in bar:
        data.start_epoch(t.seed, epoch, dd.rank)
        if dd.world > 1 and _log.isEnabledFor(logging.DEBUG):  # each rank its own share
            items = sorted(data.train_loader.sampler)  # a DDP sampler's order is seeded
            _log.debug("%s: epoch %d trains on items %s", where(), epoch, items)
        row = train_one_epoch(
            state.train_model, data.train_loader, state.optimizer, state.scheduler, f.loss_fn,
            state.ctx, Epoch(epoch, prog.num_updates, budget),
        )  # fmt: skip
        prog.num_updates = int(row.pop("num_updates"))
        record = EpochRecord(epoch, row)
        for hook in f.hooks:
            hook.after_train_pass(f, prog, record)
        out_of_time = False
        if budget is not None:
            position, out_of_time = budget.position(prog.num_updates)
            row["schedule"] = min(position / max(budget.total_updates, 1), 1.0)
            if budget.takeover is not None:
                row["clock_from"] = budget.takeover[0]
                if prog.budget_takeover is None:
                    say(takeover_note(t.max_train_minutes, *budget.takeover))
                prog.budget_takeover = budget.takeover
        metric = None
        if (epoch + 1) % t.val_every == 0 or epoch == t.epochs - 1 or out_of_time:
            for hook in f.hooks:
                hook.before_validation(f, prog, record)
            val = record.val = validate(
                state.eval_model, data.val_loader, data.cache, f.loss_fn, state.ctx,
                thresholds=0.5, oof=record.oof, window=cfg.data.patch_size,
                overlap=t.val_overlap,
            )  # fmt: skip
            metric = val.metrics["dice"]
            row.update({f"val_{k}": v for k, v in val.metrics.items()})
            record.improved = metric > prog.best_dice
            if record.improved:
                prog.best_dice, prog.best_epoch = metric, epoch
            say(
                f"epoch {epoch}: val Dice {metric:.4f} (best {prog.best_dice:.4f} at epoch "
                f"{prog.best_epoch})\n" + val.table.format_compact()
            )
            for hook in f.hooks:
                hook.after_validation(f, prog, record)
            if record.improved:
                for hook in f.hooks:
                    hook.on_best(f, prog, record)
            dd.barrier()
            if dd.main and record.improved and f.on_best is not None:
                f.on_best(run)
        state.scheduler.step(epoch + 1, metric)  # epoch-based schedules (plateau needs metric)
        prog.epoch = epoch
        if budget is not None:
            prog.train_seconds = budget.elapsed()
        if out_of_time and epoch < t.epochs - 1:
            prog.cut = cut_note(t.max_train_minutes, epoch + 1, t.epochs)
            row["stop"] = prog.cut
        record.row = {"epoch": epoch, **row, "elapsed": time.monotonic() - start}
        for hook in f.hooks:
            hook.on_epoch_end(f, prog, record)
        dd.barrier()
        if prog.cut:
            say(
                f"stopping: {prog.cut}; the learning rate was annealed to its floor by "
                "then (the schedule follows the time budget)"
            )
            break
    return prog


def _device(pref: str, dd: Dist) -> torch.device:
    """``train.device``; under torchrun each rank takes its ``LOCAL_RANK`` GPU."""
    device = pick_device(pref, "train.device")
    if device.type != "cuda":
        return device
    if dd.world > 1 and ":" in pref:
        raise ConfigError(
            f"train.device={pref!r} under torchrun: use 'cuda' (each rank takes its "
            "LOCAL_RANK GPU); pick GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = device if ":" in pref else torch.device(f"cuda:{dd.local_rank}")
    torch.cuda.set_device(device)
    return device
