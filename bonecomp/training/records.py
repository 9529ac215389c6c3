"""What a run leaves besides checkpoints: ``summary.csv`` (and the same rows in the
experiment trackers of ``train.trackers``) and the out-of-fold probabilities of its best
epoch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import Config, to_dict
from bonecomp.data.cache import TrainCache
from bonecomp.distributed import Dist
from bonecomp.engine import OOFWriter
from bonecomp.fileio import atomic_write
from bonecomp.runs import OOF, OOF_INDEX, RunDir
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
        self.rows: list[dict] = []
        if self.path.exists():
            old = pd.read_csv(self.path)
            if resume_after is not None:  # rows past last.pt belong to the lost epoch
                old = old[old["epoch"] <= resume_after]
            self.rows = old.to_dict("records")
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
    cfg: Config, run: RunDir, cache: TrainCache, val_idx: np.ndarray, dd: Dist
) -> OOFWriter:
    """A float16 memmap for this validation pass's probabilities, shared by the ranks;
    it replaces ``oof.npy`` only if the epoch turns out to be the best (``commit_oof``)."""
    size = cfg.train.oof_size
    path = run.staged(OOF)
    shape = (len(val_idx), NUM_CLASSES, size, size)
    if dd.main:
        run.path.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, "w+", np.float16, shape).flush()
        index = cache.index.iloc[val_idx].reset_index(drop=True)
        index.insert(0, "row", np.arange(len(val_idx)))
        index.to_csv(run.staged(OOF_INDEX), index=False)
    dd.barrier()
    array = np.load(path, mmap_mode="r+")
    row_of = {int(i): r for r, i in enumerate(val_idx)}
    return OOFWriter(array, row_of, size)


def commit_oof(run: RunDir) -> None:
    """Make the staged OOF arrays the run's ``oof.npy`` / ``oof_index.csv``."""
    for name, target in ((OOF, run.oof), (OOF_INDEX, run.oof_index)):
        os.replace(run.staged(name), target)
