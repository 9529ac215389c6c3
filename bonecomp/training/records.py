"""What a run leaves besides checkpoints: ``summary.csv`` (and the same rows in the
experiment trackers of ``train.trackers``) and the out-of-fold probabilities of its best
epoch."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from bonecomp import distributed
from bonecomp.classes import NUM_CLASSES
from bonecomp.config import Config, to_dict
from bonecomp.data.cache import TrainCache
from bonecomp.distributed import Dist
from bonecomp.engine import OOFWriter
from bonecomp.fileio import atomic_write, output_errors, preallocate, reserve
from bonecomp.runs import OOF, OOF_EPOCH, OOF_INDEX, RunDir, oof_epoch
from bonecomp.trackers import Trackers

FIRST = ("epoch", "loss")  # leading columns; the rest follow in the order they appear


class SummaryLog:
    """``summary.csv``: one row per epoch with whatever the loops returned.

    The file is rewritten atomically on each row (it is small): a kill never leaves a
    torn row, and a column that appears later (e.g. validation every few epochs) gets
    its place.
    """

    def __init__(self, cfg: Config, run: RunDir, resume_after: int | None = None) -> None:
        self.path = run.summary
        old = run.read_summary()  # empty when missing or empty
        if resume_after is not None and len(old):  # rows past last.pt: the lost epoch's
            old = old[old["epoch"] <= resume_after]
        self.rows: list[dict] = old.to_dict("records")
        self.trackers = Trackers(cfg.train.trackers, to_dict(cfg), run)

    def log(self, row: dict) -> None:
        """Append ``row`` to ``summary.csv`` and send it to every tracker."""
        self.rows.append(dict(row))
        df = pd.DataFrame(self.rows)
        cols = [c for c in FIRST if c in df] + [c for c in df if c not in FIRST]
        with atomic_write(self.path) as f:
            df[cols].to_csv(f, index=False)
        values = {
            k: v if isinstance(v, str) else float(v)
            for k, v in row.items()
            if k != "epoch" and (isinstance(v, str) or _finite(v))
        }
        self.trackers.log(values, int(row["epoch"]))

    def final(self, run: RunDir, report: Path | None) -> None:
        """The best epoch's per-class Dice and the report (when written) to the trackers."""
        if run.dice_csv.exists():
            dice = pd.read_csv(run.dice_csv)
            self.trackers.log_final(dict(zip(dice["class"], map(float, dice["dice"]), strict=True)))
        if report is not None and report.exists():
            self.trackers.artifact(report)

    def close(self, ok: bool = True) -> None:
        """Finish the trackers' runs (``ok=False``: training failed)."""
        self.trackers.finish(ok)


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def stage_oof(
    cfg: Config, run: RunDir, cache: TrainCache, val_idx: np.ndarray, dd: Dist, epoch: int = -1
) -> OOFWriter:
    """Where this validation pass's probabilities go; it replaces ``oof.npy`` only if the
    epoch turns out to be the best (``commit_oof``, after ``best.pt`` is saved). The index
    records ``epoch``, so the maps and ``best.pt`` can be matched after a kill between
    the two (``settle_oof``; readers refuse maps of another epoch than best.pt's).

    Rank 0 writes a float16 memmap in the run folder; the other ranks never open the run
    folder (on another node it is not there: no shared file system is needed) and keep
    their share of the rows (``val_idx[rank::world]``, as ``build_loaders`` splits
    validation) in an anonymous temporary file, which ``gather_oof`` sends to rank 0.
    """
    size = cfg.train.oof_size
    row_shape = (NUM_CLASSES, size, size)
    if not dd.main:
        mine = val_idx[dd.rank :: dd.world]
        shape = (len(mine), *row_shape)
        buffer = np.zeros(shape, np.float16)  # no validation image on this rank: no file
        if len(mine):
            # unlinked at creation: nothing is left behind, however the process ends
            with tempfile.TemporaryFile() as f:  # the map keeps its own handle
                with output_errors(Path(tempfile.gettempdir()) / "oof rows"):
                    reserve(f.fileno(), int(np.prod(shape)) * 2)  # no SIGBUS on a full disk
                buffer = np.memmap(f, np.float16, "w+", shape=shape)
        return OOFWriter(buffer, {int(i): r for r, i in enumerate(mine)}, size)
    run.path.mkdir(parents=True, exist_ok=True)
    staged = run.staged(OOF)
    with output_errors(staged):  # a full disk: one line naming the file, never a SIGBUS
        array = np.lib.format.open_memmap(staged, "w+", np.float16, (len(val_idx), *row_shape))
        preallocate(staged)  # every block reserved before the map is written
    index = cache.index.iloc[val_idx].reset_index(drop=True)
    index.insert(0, "row", np.arange(len(val_idx)))
    index[OOF_EPOCH] = epoch
    with output_errors(run.staged(OOF_INDEX)):
        index.to_csv(run.staged(OOF_INDEX), index=False)
    return OOFWriter(array, {int(i): r for r, i in enumerate(val_idx)}, size)


def gather_oof(oof: OOFWriter, dd: Dist) -> None:
    """Send the other ranks' rows of a validation pass to rank 0's staged OOF (every rank
    calls it; a no-op on one process)."""

    def put(rank: int, k: int, row: np.ndarray) -> None:
        oof.array[rank + k * dd.world] = row  # row k of rank r is val_idx[r + k * world]

    distributed.gather_rows(oof.array, put)
    if dd.main:
        oof.array.flush()


def commit_oof(run: RunDir) -> None:
    """Make the staged OOF arrays the run's ``oof.npy`` / ``oof_index.csv``."""
    for name, target in ((OOF, run.oof), (OOF_INDEX, run.oof_index)):
        os.replace(run.staged(name), target)


def settle_oof(run: RunDir, best_epoch: int) -> str | None:
    """On ``--resume`` (rank 0, before any validation): make the committed OOF maps those
    of ``best.pt``'s epoch when a killed process left them staged (killed after saving
    ``best.pt``, before or between the two renames of ``commit_oof``: the re-run epoch
    ties ``best.pt``'s score, so it would never commit them again). Returns what was done
    (None: nothing to do)."""
    if best_epoch < 0 or oof_epoch(run.oof_index) == best_epoch:
        return None
    if oof_epoch(run.staged(OOF_INDEX)) != best_epoch:
        return None  # maps of no checkpoint's epoch: the readers refuse them, naming why
    for name, target in ((OOF, run.oof), (OOF_INDEX, run.oof_index)):
        if run.staged(name).exists():  # the map is gone when it was renamed already
            os.replace(run.staged(name), target)
    return (
        f"committed the out-of-fold maps of best epoch {best_epoch}, left staged by the "
        "process that was stopped"
    )


def discard_staged_oof(run: RunDir) -> None:
    """Remove a staged OOF that did not become the run's (its epoch was not the best, or
    training stopped): a finished or failed run leaves no ``.staged`` file."""
    for name in (OOF, OOF_INDEX):
        run.staged(name).unlink(missing_ok=True)
