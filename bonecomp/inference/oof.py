"""The one reader of a run's out-of-fold maps: ``oof.npy`` and its ``oof_index.csv``.

Training (``training.records.stage_oof``) saves, for the best epoch of a fold, one
float16 map ``(C, S, S)`` per validation image (``train.oof_size`` = S) and an index row
per map: ``row`` (the map's row in ``oof.npy``), ``rel``, ``patient``, ``name`` and
``src_h, src_w`` (the source size the map stands for), ``epoch`` (whose validation made
the maps: they must be ``best.pt``'s, else ``open_oof`` refuses them), plus, for a crop
experiment (``data.crop``), the carpal box it was predicted on
(``data.carpal_box.BOX_COLUMNS``; the map and ``src_h, src_w`` are then in the box's
frame).

``open_oof`` checks both files once (present, readable, shapes that agree) and keeps the
array memory-mapped: ``RunOOF.probs`` reads one image's map when asked, so threshold
tuning, class-wise weights, the crop stage's OOF Dice, the overlays and the report hold
one image at a time whatever the fold's size. Every problem is one ``RunError`` naming
the file and what to do::

    oof = open_oof(run, crop=False)       # refuses a crop experiment's maps
    for r in oof.rows:
        probs = oof.probs(r)              # (C, S, S) float32 tensor, read now
        ... r.rel, r.hw, r.box ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonecomp.checkpoint import checkpoint_epoch
from bonecomp.classes import NUM_CLASSES
from bonecomp.data.carpal_box import BOX_COLUMNS, Box, index_boxes
from bonecomp.runs import OOF, OOF_EPOCH, RunDir, RunError, crop_stage_error

INDEX_COLUMNS = ("row", "rel", "name", "src_h", "src_w")  # what every oof_index.csv holds


@dataclass(frozen=True)
class OofRow:
    """One image of a run's OOF: where its map is and what frame it stands for."""

    rel: str  # <patient>/<name>.png, the key shared with the data table and the cache
    name: str
    row: int  # its map's row in oof.npy
    hw: tuple[int, int]  # source size the map stands for (a crop run: the box's size)
    box: Box | None = None  # a crop run's box (y0, y1, x0, x1) in source pixels


@dataclass(frozen=True)
class RunOOF:
    """A run's saved out-of-fold maps, memory-mapped, with one ``OofRow`` per map."""

    run: RunDir
    array: np.ndarray  # (N, C, S, S) float16, memory-mapped read-only
    rows: list[OofRow]

    @property
    def size(self) -> int:
        """S: the maps' side (``train.oof_size`` of the run)."""
        return int(self.array.shape[-1])

    @property
    def crop(self) -> bool:
        """Whether the maps cover crop boxes (a ``data.crop`` experiment)."""
        return bool(self.rows) and self.rows[0].box is not None

    def probs(self, row: OofRow | int) -> torch.Tensor:
        """One map as a (C, S, S) float32 tensor, read from disk now."""
        r = row.row if isinstance(row, OofRow) else int(row)
        return torch.from_numpy(np.asarray(self.array[r], np.float32))


def has_oof(run: RunDir) -> bool:
    """Whether the run saved out-of-fold maps (both files are there)."""
    return run.oof.is_file() and run.oof_index.is_file()


def open_oof(run: RunDir | Path | str, crop: bool | None = None) -> RunOOF:
    """The run's OOF maps and index rows, checked; ``crop`` True/False refuses runs whose
    maps do not / do cover crop boxes (None: either).

    Missing files, an unreadable index, a damaged ``oof.npy`` or shapes that disagree
    with the index each raise one ``RunError`` naming the file.
    """
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    if not has_oof(run):
        raise RunError(
            f"{run}: no out-of-fold predictions ({OOF}); train with train.save_oof=true first"
        )
    retrain = f"retrain the fold with train.save_oof=true (scripts/train.py --fold {_fold(run)})"
    index = _read_index(run, retrain)
    boxes = index_boxes(index)
    if crop is False and boxes is not None:
        raise crop_stage_error(run)  # its maps cover the carpal box, not the image
    if crop is True and boxes is None:
        raise RunError(f"{run.oof_index} has no crop boxes: not a data.crop experiment")
    _check_epoch(run, index)
    try:
        array = np.load(run.oof, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise RunError(f"{run.oof}: damaged, cannot be read ({e}); {retrain}") from e
    shape = tuple(array.shape)
    if len(shape) != 4 or shape[1] != NUM_CLASSES or shape[2] != shape[3]:
        raise RunError(
            f"{run.oof}: maps of shape {shape}, expected (N, {NUM_CLASSES}, S, S); {retrain}"
        )
    n = shape[0]
    rows_ok = index["row"].between(0, n - 1).all() and not index["row"].duplicated().any()
    if len(index) != n or not rows_ok:
        raise RunError(
            f"{run.oof}: {n} maps, but {run.oof_index} lists {len(index)} images with rows "
            f"outside 0..{n - 1} or repeated; the two files are from different runs; {retrain}"
        )
    columns = (index[c] for c in ("rel", "name", "row", "src_h", "src_w"))
    rows = [
        OofRow(rel, name, int(r), (int(h), int(w)), boxes[i] if boxes else None)
        for i, (rel, name, r, h, w) in enumerate(zip(*columns, strict=True))
    ]
    return RunOOF(run, array, rows)


def by_image(oofs: Sequence[RunOOF]) -> dict[str, list[tuple[RunOOF, OofRow]]]:
    """rel -> [(run's OOF, its row)] of every run holding the image, in run order."""
    out: dict[str, list[tuple[RunOOF, OofRow]]] = {}
    for oof in oofs:
        for r in oof.rows:
            out.setdefault(r.rel, []).append((oof, r))
    return out


def _check_epoch(run: RunDir, index: pd.DataFrame) -> None:
    """The maps are ``best.pt``'s: a ``RunError`` when the index records another epoch than
    ``best.pt``'s (a process killed between saving the two; ``--resume`` settles them).
    Maps written before the epoch was recorded, or a run without ``best.pt``, pass."""
    if OOF_EPOCH not in index.columns or not len(index) or not run.best.is_file():
        return
    maps, best = int(index[OOF_EPOCH].iloc[0]), checkpoint_epoch(run.best)
    if best is not None and maps != best:
        raise RunError(
            f"{run.oof}: out-of-fold maps of epoch {maps}, but {run.best.name} is epoch {best}: "
            "they do not belong together (training was stopped between saving them); "
            f"resume the run to settle them (scripts/train.py --fold {_fold(run)} --resume)"
        )


def _read_index(run: RunDir, retrain: str) -> pd.DataFrame:
    try:
        index = pd.read_csv(run.oof_index, dtype={"rel": str, "name": str})
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise RunError(f"{run.oof_index}: cannot be read ({e}); {retrain}") from e
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if BOX_COLUMNS[0] in index.columns:
        missing += [c for c in BOX_COLUMNS if c not in index.columns]
    if missing:
        raise RunError(f"{run.oof_index}: no column(s) {missing}; {retrain}")
    try:
        for c in ("row", "src_h", "src_w", *(c for c in BOX_COLUMNS if c in index.columns)):
            index[c] = index[c].astype(np.int64)
    except (TypeError, ValueError) as e:
        raise RunError(f"{run.oof_index}: non-integer values ({e}); {retrain}") from e
    return index


def _fold(run: RunDir) -> str:
    try:
        return str(run.fold)
    except ValueError:  # not a fold<k> folder
        return "<k>"
