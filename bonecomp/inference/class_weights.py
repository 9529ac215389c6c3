"""Class-wise ensemble weights tuned on out-of-fold probabilities, with the thresholds.

For each class, each experiment of the ensemble gets a weight (its folds share it: they
cover disjoint images) and the class a threshold, chosen together to maximise the
competition Dice at each image's source size, as ``thresholds.grid_dice`` scores it.
Against overfitting the weights lie on a coarse simplex grid (``step``) with at least
``min_share`` per experiment, and a class keeps the configured weights (uniform by
default) unless another choice beats them by more than ``min_gain``. The configured
weights at 0.5 are always a candidate, so tuning never lowers the OOF Dice.

Each OOF image is read once (every experiment's map and the truth crops); every
(weights, threshold) candidate is then scored on it, so memory stays one image.

The result lives in the thresholds file (``postfile.PostFile``) as a ``class_weights``
table ``{experiment: [one weight per class]}``: thresholds and weights are tuned
together and must travel together (``tune_thresholds`` drops the table, saying so, as its
thresholds were tuned on the configured weights). Inference applies the table when
present; a table for other experiments than the ensemble's is refused.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bonecomp.classes import CLASSES
from bonecomp.config import Config
from bonecomp.data.truth import GroundTruth
from bonecomp.inference.postfile import PostFile, retuned
from bonecomp.inference.thresholds import (
    DEFAULT,
    GRID,
    choose,
    image_dice,
    oof_maps,
    weighted_mean,
)
from bonecomp.metrics import DiceTable
from bonecomp.runs import MemberSpec, RunError, thresholds_in_use, thresholds_path

STEP = 0.1
MIN_SHARE = 0.1
MIN_GAIN = 1e-3
MAX_GRID = 2_000_000  # weight combinations enumerated before the simplex filter


@dataclass
class EnsembleTuneResult:
    experiments: list[str]
    candidates: np.ndarray  # (K, E) weights; row 0 is the configured (default) weights
    grid: tuple[float, ...]
    dice: np.ndarray  # (C, K, G): mean OOF Dice per class, weights and threshold
    weights: np.ndarray  # (C, E) chosen, each row sums to 1
    thresholds: list[float]
    before: DiceTable  # configured weights, 0.5
    thresholds_only: DiceTable  # configured weights, tuned thresholds
    after: DiceTable  # tuned weights and thresholds
    seconds: float = 0.0
    file_note: str = ""  # what re-tuning kept or dropped of the file it rewrote

    @property
    def class_weights(self) -> dict[str, list[float]]:
        """The table the thresholds file stores: {experiment: [weight per class]}."""
        return {e: [float(v) for v in self.weights[:, i]] for i, e in enumerate(self.experiments)}

    def format(self) -> str:
        """Per-class OOF Dice before / thresholds only / weights + thresholds, then the
        chosen threshold ``t`` and each experiment's weight."""
        head = f"{'class':<12} {'before':>8} {'thr-only':>8} {'w+thr':>8}  t     " + " ".join(
            f"{e[:10]:>10}" for e in self.experiments
        )
        rows = [head]
        for c, name in enumerate(CLASSES):
            d = (self.before, self.thresholds_only, self.after)
            ws = " ".join(f"{w:10.2f}" for w in self.weights[c])
            cells = " ".join(f"{t.per_class[c]:8.4f}" for t in d)
            rows.append(f"{name:<12} {cells}  {self.thresholds[c]:.2f} {ws}")
        means = " ".join(f"{t.mean:8.4f}" for t in (self.before, self.thresholds_only, self.after))
        rows.append(f"{'mean':<12} {means}")
        return "\n".join(rows)


def simplex_grid(n: int, step: float = STEP, min_share: float = MIN_SHARE) -> np.ndarray:
    """(K, n) weight vectors on the simplex in multiples of ``step``, each >= ``min_share``."""
    units = round(1 / step) if 0 < step <= 1 else 0
    if n < 1 or not units or not math.isclose(units * step, 1.0) or not 0 <= min_share * n <= 1:
        raise ValueError(
            f"weight grid: step must divide 1 and min_share x {n} experiments must be <= 1, "
            f"got step={step}, min_share={min_share}"
        )
    low = math.ceil(min_share * units - 1e-9)
    if (units - low + 1) ** n > MAX_GRID:
        raise ValueError(
            f"weight grid: step={step} with {n} experiments is too fine to search "
            "(a coarse grid also guards against overfitting the OOF images); use a larger step"
        )
    rows = [c for c in itertools.product(range(low, units + 1), repeat=n) if sum(c) == units]
    if not rows:
        raise ValueError(f"weight grid: no point with step={step} and min_share={min_share}")
    return np.array(rows, np.float64) / units


def score_candidates(
    maps: dict[str, torch.Tensor],
    truth: list,
    hw: tuple[int, int],
    experiments: Sequence[str],
    candidates: np.ndarray,
    grid: Sequence[float],
) -> np.ndarray:
    """Dice (C, K, G) of one image for every weights candidate and threshold.

    An experiment without this image drops out; the others' weights are renormalised.
    """
    out = []
    for w in candidates:
        weight = {e: float(w[i]) for i, e in enumerate(experiments)}
        out.append(image_dice(weighted_mean(maps, weight), truth, hw, grid))
    return np.stack(out, axis=1)


def choose_weights(
    dice: np.ndarray, grid: Sequence[float], min_gain: float = MIN_GAIN
) -> tuple[np.ndarray, np.ndarray, DiceTable, DiceTable, DiceTable]:
    """Per class: (weights index, threshold index) and the before / thresholds only / after
    tables. Candidate 0 (the configured weights) with its tuned threshold is kept unless
    another (weights, threshold) beats it by more than ``min_gain``."""
    C, K, G = dice.shape
    base = choose(dice[:, 0, :], grid, min_gain)
    t0 = np.array([list(grid).index(t) for t in base.thresholds])
    flat = dice.reshape(C, K * G).argmax(axis=1)
    k, g = np.divmod(flat, G)
    rows = np.arange(C)
    better = dice[rows, k, g] - dice[rows, 0, t0] > min_gain
    k, g = np.where(better, k, 0), np.where(better, g, t0)
    return k, g, base.before, base.after, DiceTable(dice[rows, k, g], n_images=0)


def tune_ensemble(
    cfg: Config,
    members: Sequence[MemberSpec],
    grid: Sequence[float] = GRID,
    step: float = STEP,
    min_share: float = MIN_SHARE,
    min_gain: float = MIN_GAIN,
    out: Path | str | None = None,
    progress: bool = True,
) -> tuple[EnsembleTuneResult, Path]:
    """Tune per-class weights of each experiment and per-class thresholds on the members'
    OOF probabilities; write them to the thresholds file inference reads
    (``runs.thresholds_path(cfg)`` unless ``out``), keeping its still-valid parts
    (``result.file_note`` says which: ``postfile.retuned``)."""
    grid = tuple(grid)
    if DEFAULT not in grid:
        raise ValueError(f"the threshold grid must contain {DEFAULT}")
    path = Path(out) if out else thresholds_path(cfg)
    old = PostFile.read(path) if path.is_file() else None  # a bad file: before the work
    configured: dict[str, float] = {}
    for m in members:
        configured.setdefault(m.run.experiment, m.weight)
    experiments = list(configured)
    default = np.array([configured[e] for e in experiments]) / sum(configured.values())
    grid_w = simplex_grid(len(experiments), step, min_share)
    keep = ~np.all(np.isclose(grid_w, default), axis=1)
    candidates = np.vstack([default, grid_w[keep]])

    t0 = time.monotonic()
    total, n = None, 0
    for maps, truth, hw in oof_maps(members, GroundTruth.of(cfg.data), progress):
        d = score_candidates(maps, truth, hw, experiments, candidates, grid)
        total = d if total is None else total + d
        n += 1
    if n == 0:
        raise ValueError("no out-of-fold images to tune on")
    dice = total / n
    k, g, before, thr_only, after = choose_weights(dice, grid, min_gain)
    for table in (before, thr_only, after):
        table.n_images = n
    result = EnsembleTuneResult(
        experiments,
        candidates,
        grid,
        dice,
        candidates[k],
        [float(grid[i]) for i in g],
        before,
        thr_only,
        after,
        time.monotonic() - t0,
    )
    post, result.file_note = retuned(
        old,
        path,
        result.thresholds,
        runs=[str(m.run) for m in members],
        class_weights=result.class_weights,
        grid=list(grid),
        weight_step=step,
        min_share=min_share,
        oof_images=n,
        dice_before=before.mean,
        dice_thresholds_only=thr_only.mean,
        dice_after=after.mean,
    )
    post.write(path)
    return result, path


def read_class_weights(path: Path | str) -> dict[str, list[float]] | None:
    """The ``class_weights`` table of a thresholds file, or None when it has none; a
    damaged file is a ``RunError`` naming it (``PostFile.read``)."""
    return PostFile.read(path).class_weights


def resolve_class_weights(
    cfg: Config, members: Sequence[MemberSpec]
) -> tuple[list[float | torch.Tensor], dict[str, list[float]] | None, str]:
    """Each member's weight for ``Ensemble``, the table used (or None) and a line saying
    where the weights came from.

    The thresholds file in use (``infer.thresholds``, else the tuned file of
    ``infer.name``) may hold a ``class_weights`` table: each member then gets its
    experiment's (C,) weights. A table whose experiments differ from the members' is
    refused: its weights were chosen for another mix of models.

    A weight belongs to an experiment, as in the OOF tuning (each OOF image is predicted
    by one fold per experiment): the folds of an experiment share it, so an experiment
    with five folds does not outweigh one with two. (The factor is 1 when every
    experiment has as many folds, leaving those ensembles' arithmetic unchanged.)
    """
    counts = Counter(m.run.experiment for m in members)
    most = max(counts.values(), default=1)
    share = [most / counts[m.run.experiment] for m in members]
    path = thresholds_in_use(cfg)
    table = read_class_weights(path) if path.is_file() else None
    if table is None:
        scalar = [m.weight * s for m, s in zip(members, share, strict=True)]
        return scalar, None, "scalar member weights (infer.ensemble)"
    used = sorted(counts)
    if sorted(table) != used:
        raise RunError(
            f"{path}: class_weights were tuned for experiments {sorted(table)}, but these "
            f"models are {used}; use the tuned ensemble (infer.py --ensemble), or other "
            "thresholds with infer.thresholds=<file> (scripts/tune_thresholds.py --out <file>)"
        )
    weights = [
        torch.tensor(table[m.run.experiment], dtype=torch.float32) * s
        for m, s in zip(members, share, strict=True)
    ]
    return weights, table, f"class weights from {path}"
