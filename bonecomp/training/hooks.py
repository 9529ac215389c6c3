"""The epoch loop's extras as hooks: what a run keeps besides training its model.

The loop (``fold._epochs``) trains and validates; everything else hangs on one list of
``EpochHook`` objects, each called at fixed points of every epoch, in the list's order:

- ``TrackingHook``: ``summary.csv`` and the experiment trackers (rank 0)
- ``CheckpointHook``: ``best.pt`` after a new best, ``last.pt`` after every epoch
- ``OOFHook`` (``train.save_oof``): the out-of-fold maps of ``best.pt``'s epoch
- ``AveragingHook`` (``train.average``): the pool of chosen epochs, then ``averaged.pt``

The order is what keeps a killed run resumable: the summary row before ``last.pt`` (a
resume drops rows past it), ``best.pt`` before its OOF maps are committed, the pool files
``last.pt`` no longer names deleted after it is saved. Every rank calls every hook (some
collect across ranks); those that write files do so on rank 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from bonecomp import distributed
from bonecomp.engine import OOFWriter, Validation, validate
from bonecomp.training.average import Averager, recompute_bn
from bonecomp.training.records import SummaryLog, commit_oof, gather_oof, stage_oof
from bonecomp.training.state import Progress, save_averaged, save_best, save_last

if TYPE_CHECKING:
    from bonecomp.training.fold import FoldRun


@dataclass
class EpochRecord:
    """What one epoch produced so far, filled in by the loop as it goes."""

    epoch: int
    row: dict = field(default_factory=dict)  # the summary row: the training pass, val_*, ...
    val: Validation | None = None  # this epoch's validation; None when it had none
    improved: bool = False  # ``val`` beat every earlier validation (a new best.pt)
    oof: OOFWriter | None = None  # where the validation writes its maps (``OOFHook``)


class EpochHook:
    """Something the epoch loop calls at fixed points; each method does nothing here, a
    hook overrides those it needs. ``f`` is the fold's ``FoldRun``, ``prog`` its
    ``Progress`` (what ``last.pt`` saves), ``record`` the epoch's ``EpochRecord``."""

    def after_train_pass(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        """The epoch's updates are done: the weights are the epoch's."""

    def before_validation(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        """A validation pass follows (it writes its maps to ``record.oof`` when set)."""

    def after_validation(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        """``record.val`` holds the pass; ``prog`` the best so far, this one counted."""

    def on_best(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        """The pass beat every earlier one (after every ``after_validation``)."""

    def on_epoch_end(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        """The epoch is over: ``prog`` is where a resume would start; ``record.row`` is
        the summary row, complete."""

    def on_train_end(self, f: FoldRun, prog: Progress) -> None:
        """After the last epoch (or the one the time budget stopped at)."""


@dataclass
class TrackingHook(EpochHook):
    """Each epoch's row to ``summary.csv`` and the trackers (rank 0 holds the log)."""

    log: SummaryLog

    def on_epoch_end(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        self.log.log(record.row)


class CheckpointHook(EpochHook):
    """``best.pt`` after a new best validation, ``last.pt`` after every epoch (rank 0)."""

    def on_best(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        if f.dd.main:
            save_best(f.run, f.cfg, f.fold, record.epoch, f.state.eval_model, record.val)

    def on_epoch_end(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        if f.dd.main:
            save_last(f.run, f.cfg, f.fold, f.state, prog)


class OOFHook(EpochHook):
    """``train.save_oof``: each validation's maps are staged, gathered on rank 0 and made
    the run's ``oof.npy`` when the epoch is a new best, after ``best.pt`` is saved (so
    ``settle_oof`` can finish a commit a kill interrupted): after ``CheckpointHook``."""

    def before_validation(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        record.oof = stage_oof(f.cfg, f.run, f.data.cache, f.data.val_idx, f.dd, record.epoch)

    def after_validation(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        if record.oof is not None:
            gather_oof(record.oof, f.dd)  # the other ranks' rows to rank 0's staged file

    def on_best(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        if f.dd.main and record.oof is not None:
            commit_oof(f.run)


@dataclass
class AveragingHook(EpochHook):
    """``train.average``: the chosen epochs' weights kept in the pool while training (see
    ``Averager``), ``averaged.pt`` made of them at the end; after ``CheckpointHook`` (pool
    files go only once ``last.pt`` no longer names them)."""

    averager: Averager
    dice: float | None = None  # averaged.pt's val Dice, once made

    def after_train_pass(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        self.averager.after_epoch(record.epoch, f.state.eval_model, f.run, f.dd.main)

    def after_validation(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        dice = record.val.metrics["dice"]
        self.averager.after_validation(record.epoch, dice, f.state.eval_model, f.run, f.dd.main)

    def on_epoch_end(self, f: FoldRun, prog: Progress, record: EpochRecord) -> None:
        if f.dd.main:
            self.averager.after_save(f.run)  # pool files last.pt no longer names

    def on_train_end(self, f: FoldRun, prog: Progress) -> None:
        self.dice = make_averaged(f, self.averager, prog)


def make_averaged(f: FoldRun, avg: Averager, prog: Progress) -> float | None:
    """The mean of the chosen epochs' weights (rank 0, sent to every rank), BatchNorm
    statistics recomputed on rank 0's training batches, validated on every rank as
    ``best.pt`` is, saved as ``averaged.pt`` by rank 0; returns its val Dice (None: no
    epoch was collected)."""
    state, t, dd = f.state, f.cfg.train, f.dd
    say = tqdm.write if dd.main else (lambda *_: None)
    model = copy.deepcopy(state.eval_model)
    chosen = avg.epochs_chosen()
    weights, forwards = None, 0
    if dd.main and chosen:
        weights = avg.mean_weights(model, f.run)
        model.load_state_dict(weights)
        forwards = recompute_bn(model, f.data.train_loader, state.ctx)
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights, forwards = distributed.broadcast_object((weights, forwards))
    if weights is None:
        say("no averaged.pt: train.average kept no epoch")  # cannot happen: a guard
        return None
    model.load_state_dict(weights)
    val = validate(  # validated as best.pt is: windows of a patch run's side
        model, f.data.val_loader, f.data.cache, f.loss_fn, state.ctx, thresholds=0.5,
        oof=None, window=f.cfg.data.patch_size, overlap=t.val_overlap,
    )  # fmt: skip
    asked = {k: v for k, v in (("last", t.average.last), ("best", t.average.best)) if v}
    how = {**asked, "epochs": chosen, "bn_forwards": forwards}
    if dd.main:
        save_averaged(f.run, f.cfg, f.fold, model, val, how)
    dd.barrier()
    dice = val.metrics["dice"]
    bn = f", BatchNorm statistics recomputed over {forwards} training batches" if forwards else ""
    say(
        f"averaged.pt: mean of epochs {chosen} ({', '.join(f'{k} {v}' for k, v in asked.items())}"
        f"{bn}): val Dice {dice:.4f} (best.pt {prog.best_dice:.4f})"
    )
    return dice
