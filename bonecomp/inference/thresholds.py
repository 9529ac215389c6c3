"""Per-class thresholds tuned on out-of-fold probabilities, scored the leaderboard's way.

For each OOF image the probabilities (saved downsampled by training) are upsampled
exactly to the image's size and thresholded on a grid; the competition Dice against the
exact ground truth is averaged over images. A class keeps 0.5 unless another threshold
beats it by more than ``min_gain``: small classes have few pixels and the grid is coarse
on purpose, both against overfitting. Since 0.5 is always a candidate, tuning never
lowers the OOF Dice.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bonecomp.classes import CLASSES
from bonecomp.config import Config
from bonecomp.data.rasterize import truth_crops
from bonecomp.data.truth import GroundTruth, as_truth
from bonecomp.inference.oof import OofRow, RunOOF, open_oof
from bonecomp.inference.postfile import PostFile, retuned
from bonecomp.inference.postprocess import as_thresholds, overlap_counts, upsample_threshold
from bonecomp.metrics import DiceTable, dice_from_counts
from bonecomp.runs import MemberSpec, run_name, thresholds_in_use, thresholds_path

GRID: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
DEFAULT = 0.5


@dataclass
class TuneResult:
    grid: tuple[float, ...]
    dice: np.ndarray  # (C, G): mean Dice over images per class and threshold
    thresholds: list[float]
    before: DiceTable
    after: DiceTable
    file_note: str = ""  # what re-tuning kept or dropped of the file it rewrote


def grid_dice(
    items: Iterable[tuple[torch.Tensor, list, tuple[int, int]]],
    grid: Sequence[float | Sequence[float]] = GRID,
) -> tuple[np.ndarray, int]:
    """Mean Dice (C, G) over images; items are (probs (C,h,w), truth crops, (H, W))."""
    total, n = None, 0
    for probs, truth, hw in items:
        d = image_dice(probs, truth, hw, grid)
        total = d if total is None else total + d
        n += 1
    if n == 0:
        raise ValueError("no out-of-fold images to tune on")
    return total / n, n


def image_dice(
    probs: torch.Tensor, truth: list, hw: tuple[int, int], grid: Sequence[float | Sequence[float]]
) -> np.ndarray:
    """Dice (C, G) of one image's probabilities at each threshold of ``grid`` (a value, or
    one per class), scored at its source size against its truth crops."""
    per_t = []
    for t in grid:
        masks = upsample_threshold(probs, hw, t, logits=False).masks
        per_t.append(dice_from_counts(*overlap_counts(masks, truth)))
    return np.stack(per_t, axis=1)


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
        grid,
        dice,
        thresholds,
        DiceTable(dice[:, k], n_images=0),
        DiceTable(dice[rows, pick], n_images=0),
    )


def oof_items(
    members: Sequence[MemberSpec],
    truth: GroundTruth | Path | str,
    progress: bool = True,
    class_weights: dict[str, Sequence[float]] | None = None,
) -> Iterator[tuple[torch.Tensor, list, tuple[int, int]]]:
    """(probs, truth crops, hw) per OOF image: the members' weighted mean probability,
    with each experiment's scalar weight or, given ``class_weights``, its (C,) weights.

    ``truth``: where the polygons come from (``GroundTruth.of(cfg.data)``: the cache,
    else the JSON), or a data root (its JSON). Folds of one experiment cover disjoint
    images; experiments of an ensemble cover the same ones. Members saved at different
    ``train.oof_size`` are brought to the largest size (bilinear) before averaging.
    """
    weight = experiment_weights(members, class_weights)
    for maps, crops, hw in oof_maps(members, truth, progress):
        yield weighted_mean(maps, weight), crops, hw


def experiment_weights(
    members: Sequence[MemberSpec], class_weights: dict[str, Sequence[float]] | None = None
) -> dict[str, float | torch.Tensor]:
    """Each experiment's weight in an OOF mean: its scalar weight, or (C, 1, 1) weights
    from a ``class_weights`` table."""
    if class_weights is None:
        return {m.run.experiment: m.weight for m in members}
    return {
        e: torch.tensor(w, dtype=torch.float32)[:, None, None] for e, w in class_weights.items()
    }


def weighted_mean(
    maps: dict[str, torch.Tensor], weight: dict[str, float | torch.Tensor]
) -> torch.Tensor:
    """The experiments' OOF maps of one image averaged with their weights (an experiment
    missing the image drops out and the rest are renormalised)."""
    return sum(p * weight[e] for e, p in maps.items()) / sum(weight[e] for e in maps)


def oof_maps(
    members: Sequence[MemberSpec], truth: GroundTruth | Path | str, progress: bool = True
) -> Iterator[tuple[dict[str, torch.Tensor], list, tuple[int, int]]]:
    """({experiment: probs (C, S, S)}, truth crops, hw) per OOF image, read once.

    Each experiment's map is its folds' prediction of the image (the mean, should two
    folds of an experiment hold it), at the largest ``train.oof_size`` of the members.
    """
    for _, maps, crops, hw in oof_maps_by_image(members, truth, progress):
        yield maps, crops, hw


def oof_maps_by_image(
    members: Sequence[MemberSpec], truth: GroundTruth | Path | str, progress: bool = True
) -> Iterator[tuple[str, dict[str, torch.Tensor], list, tuple[int, int]]]:
    """``oof_maps`` with each image's relative path first, in sorted order. A crop
    experiment's maps cover boxes, not images: such a member is refused."""
    oofs = [open_oof(m.run, crop=False) for m in members]
    size = max((o.size for o in oofs), default=0)
    parts: dict[str, dict[str, list[tuple[RunOOF, OofRow]]]] = {}
    for m, oof in zip(members, oofs, strict=True):
        for r in oof.rows:
            parts.setdefault(r.rel, {}).setdefault(m.run.experiment, []).append((oof, r))
    source = as_truth(truth)
    for rel in tqdm(sorted(parts), desc="tune", unit="img", disable=not progress):
        maps = {
            e: sum(_at_size(o.probs(r), size) for o, r in entries) / len(entries)
            for e, entries in parts[rel].items()
        }
        hw = next(iter(parts[rel].values()))[0][1].hw
        yield rel, maps, truth_crops(source.polygons(rel), hw), hw


def _at_size(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def tune_thresholds(
    cfg: Config,
    members: Sequence[MemberSpec],
    grid: Sequence[float] = GRID,
    min_gain: float = 1e-3,
    out: Path | str | None = None,
    progress: bool = True,
) -> tuple[TuneResult, Path]:
    """Tune per-class thresholds on the members' OOF probabilities and write the file
    inference reads (``runs.thresholds_path(cfg)`` unless ``out``). Re-tuning an existing
    file keeps its still-valid parts; ``result.file_note`` says what (``postfile.retuned``)."""
    path = Path(out) if out else thresholds_path(cfg)
    old = PostFile.read(path) if path.is_file() else None  # a bad file: before the work
    dice, n = grid_dice(oof_items(members, GroundTruth.of(cfg.data), progress), grid)
    result = choose(dice, grid, min_gain)
    result.before.n_images = result.after.n_images = n
    post, result.file_note = retuned(
        old,
        path,
        result.thresholds,
        runs=[str(m.run) for m in members],
        grid=list(grid),
        oof_images=n,
        dice_before=result.before.mean,
        dice_after=result.after.mean,
    )
    post.write(path)
    return result, path


def write_thresholds(path: Path | str, thresholds: Sequence[float], **info) -> Path:
    """A thresholds file of ``thresholds`` and ``info`` (``runs``, ``class_weights``,
    ``cleanup``, records), written as given (tests write bad ones); see ``PostFile``."""
    parts = {k: info.pop(k) for k in ("runs", "class_weights", "cleanup") if k in info}
    return PostFile([float(t) for t in thresholds], **parts, info=info).write(path)


def read_thresholds(path: Path | str) -> tuple[list[float], list[str]]:
    """(per-class thresholds, the run folders they were tuned on) from a thresholds file;
    a damaged file is a ``RunError`` naming it."""
    post = PostFile.read(path)
    return post.thresholds, post.runs


def resolve_thresholds(cfg: Config, members: Sequence[MemberSpec] = ()) -> tuple[list[float], str]:
    """Per-class thresholds: ``infer.thresholds``, else the tuned file of ``infer.name``,
    else ``infer.threshold`` for every class; and a line saying where they came from.

    A file tuned on other runs than ``members`` (other experiments or folds: run folders
    are compared by ``runs.run_name``, so a moved runs folder is the same) is still used,
    with a warning.
    """
    path = thresholds_in_use(cfg)
    if not (cfg.infer.thresholds or path.is_file()):
        ts = as_thresholds(cfg.infer.threshold, len(CLASSES))
        return ts, f"{cfg.infer.threshold} for all classes"
    ts, runs = read_thresholds(path)
    used = {str(m.run) for m in members}
    # the same experiments and folds are the same models, also after the runs folder moved
    if runs and used and {run_name(r) for r in used} != {run_name(r) for r in runs}:
        msg = f"{path} was tuned on {sorted(runs)}, not on these models {sorted(used)}"
        warnings.warn(msg, stacklevel=2)
        return ts, f"{path} (WARNING: {msg})"
    return ts, str(path)
