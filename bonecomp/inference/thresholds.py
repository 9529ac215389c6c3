"""Per-class thresholds tuned on out-of-fold probabilities, scored the leaderboard's way.

For each OOF image the probabilities (saved downsampled by training) are upsampled
exactly to the image's size and thresholded on a grid; the competition Dice against the
exact ground truth is averaged over images. A class keeps 0.5 unless another threshold
beats it by more than ``min_gain``: small classes have few pixels and the grid is coarse
on purpose, both against overfitting. Since 0.5 is always a candidate, tuning never
lowers the OOF Dice.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bonecomp.classes import CLASSES
from bonecomp.config import Config
from bonecomp.data.annotations import load_annotation
from bonecomp.data.rasterize import truth_crops
from bonecomp.inference.postprocess import as_thresholds, overlap_counts, upsample_threshold
from bonecomp.metrics import DiceTable, dice_from_counts

GRID: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
DEFAULT = 0.5


@dataclass
class TuneResult:
    grid: tuple[float, ...]
    dice: np.ndarray  # (C, G): mean Dice over images per class and threshold
    thresholds: list[float]
    before: DiceTable
    after: DiceTable


def grid_dice(
    items: Iterable[tuple[torch.Tensor, list, tuple[int, int]]], grid: Sequence[float] = GRID
) -> tuple[np.ndarray, int]:
    """Mean Dice (C, G) over images; items are (probs (C,h,w), truth crops, (H, W))."""
    total, n = None, 0
    for probs, truth, hw in items:
        per_t = []
        for t in grid:
            masks = upsample_threshold(probs, hw, t, logits=False).masks
            per_t.append(dice_from_counts(*overlap_counts(masks, truth)))
        d = np.stack(per_t, axis=1)  # (C, G)
        total = d if total is None else total + d
        n += 1
    if n == 0:
        raise ValueError("no out-of-fold images to tune on")
    return total / n, n


def choose(dice: np.ndarray, grid: Sequence[float] = GRID, min_gain: float = 1e-3) -> TuneResult:
    """Best threshold per class; 0.5 unless something beats it by more than ``min_gain``."""
    grid = tuple(grid)
    if DEFAULT not in grid:
        raise ValueError(f"the grid must contain {DEFAULT}")
    k = grid.index(DEFAULT)
    best = dice.argmax(axis=1)
    gain = dice[np.arange(len(dice)), best] - dice[:, k]
    pick = np.where(gain > min_gain, best, k)
    thresholds = [float(grid[i]) for i in pick]
    rows = np.arange(len(dice))
    return TuneResult(
        grid, dice, thresholds, DiceTable(dice[:, k], 0), DiceTable(dice[rows, pick], 0)
    )


def oof_items(
    run_dirs: Sequence[Path],
    data_root: Path | str,
    weights: Sequence[float] | None = None,
    progress: bool = True,
):
    """(probs, truth crops, hw) per OOF image, averaging experiments that share images.

    ``run_dirs`` are fold folders holding ``oof.npy`` and ``oof_index.csv``; folds of one
    experiment cover disjoint images, experiments of an ensemble cover the same ones.
    """
    weights = list(weights) if weights else [1.0] * len(run_dirs)
    parts = []
    for d, w in zip(run_dirs, weights, strict=True):
        index = pd.read_csv(Path(d) / "oof_index.csv", dtype={"rel": str})
        arr = np.load(Path(d) / "oof.npy", mmap_mode="r")
        parts += [
            (rel, arr, int(r), w, (int(h), int(wd)))
            for rel, r, h, wd in zip(
                index["rel"], index["row"], index["src_h"], index["src_w"], strict=True
            )
        ]
    by_image: dict[str, list] = {}
    for rel, arr, row, w, hw in parts:
        by_image.setdefault(rel, []).append((arr, row, w, hw))
    jdir = Path(data_root) / "train" / "outputs_json"
    for rel in tqdm(sorted(by_image), desc="tune", unit="img", disable=not progress):
        entries = by_image[rel]
        total = sum(w for *_, w, _ in entries)
        probs = sum(torch.from_numpy(np.asarray(a[r], np.float32)) * w for a, r, w, _ in entries)
        hw = entries[0][3]
        polys = load_annotation(jdir / Path(rel).with_suffix(".json"))
        yield probs / total, truth_crops(polys, hw), hw


def default_thresholds_path(cfg: Config) -> Path:
    """Where tune_thresholds writes and infer looks by default: runs/thresholds_<name>.json."""
    return Path(cfg.train.output_dir) / f"thresholds_{cfg.infer.name}.json"


def write_thresholds(path: Path, thresholds: Sequence[float], **info) -> Path:
    """Thresholds file (JSON: classes, thresholds, and what they were tuned on), atomic."""
    doc = {"classes": list(CLASSES), "thresholds": [float(t) for t in thresholds], **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=lambda v: np.asarray(v).tolist()))
    tmp.replace(path)
    return path


def read_thresholds(path: Path | str) -> tuple[list[float], list[str]]:
    """(per-class thresholds, the run folders they were tuned on) from a thresholds file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"thresholds file {path}: cannot read ({e})") from e
    if doc.get("classes") != list(CLASSES):
        raise ValueError(f"thresholds file {path}: classes differ from the competition's 29")
    return as_thresholds(doc["thresholds"], len(CLASSES)), list(doc.get("runs", []))


def resolve_thresholds(cfg: Config, checkpoints: Sequence[Path] = ()) -> tuple[list[float], str]:
    """Per-class thresholds: ``infer.thresholds``, else the tuned file of ``infer.name``,
    else ``infer.threshold`` for every class; and a line saying where they came from.

    A file tuned on other runs than ``checkpoints`` is still used, with a warning.
    """
    path = Path(cfg.infer.thresholds) if cfg.infer.thresholds else default_thresholds_path(cfg)
    if not (cfg.infer.thresholds or path.is_file()):
        ts = as_thresholds(cfg.infer.threshold, len(CLASSES))
        return ts, f"{cfg.infer.threshold} for all classes"
    ts, runs = read_thresholds(path)
    members = {str(Path(p).parent) for p in checkpoints}
    if runs and members and members != set(runs):
        msg = f"{path} was tuned on {sorted(runs)}, not on these models {sorted(members)}"
        warnings.warn(msg, stacklevel=2)
        return ts, f"{path} (WARNING: {msg})"
    return ts, str(path)
