"""The competition Dice, computed from counts.

Per (image, class): (2|A∩B| + 1e-4) / (|A| + |B| + 1e-4) on the full-size masks, so an
empty prediction of an empty truth scores 1. Averaged over images for each class, then
over classes. Counts (intersection, |A|, |B|) come first, so a validation loop can
accumulate them batch by batch on any device without keeping masks.

``METRICS`` is the registry of validation metrics: each is one function of the pass's
:class:`Scores` returning a float, added with ``register_metric``; validation returns
all of them and the summary log writes each as ``val_<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from bonecomp.classes import CLASSES
from bonecomp.distributed import all_reduce_sum
from bonecomp.registry import Registry

SMOOTH = 1e-4


def dice_from_counts(inter: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Competition Dice (float64) from integer counts of any matching shape."""
    inter, pred, gt = (np.asarray(a, np.float64) for a in (inter, pred, gt))
    return (2 * inter + SMOOTH) / (pred + gt + SMOOTH)


def dice_from_counts_torch(
    inter: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor
) -> torch.Tensor:
    """Torch twin of ``dice_from_counts`` (float64 on the counts' device)."""
    inter, pred, gt = (t.to(torch.float64) for t in (inter, pred, gt))
    return (2 * inter + SMOOTH) / (pred + gt + SMOOTH)


def dice_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """(intersection, |pred|, |gt|) over the last two axes of boolean-like masks."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    axes = (-2, -1)
    return (p & g).sum(axes), p.sum(axes), g.sum(axes)


@dataclass
class DiceTable:
    """Mean Dice per class (in class order) and the overall mean of those."""

    per_class: np.ndarray  # (C,)
    n_images: int

    @property
    def mean(self) -> float:
        return float(self.per_class.mean())

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"class": list(CLASSES), "dice": self.per_class})

    def format(self, other: DiceTable | None = None, labels: tuple[str, str] = ("dice", "")) -> str:
        """A per-class text table (optionally beside a second table), then the mean."""
        head = f"{'class':<12} {labels[0]:>8}" + (f" {labels[1]:>8}" if other else "")
        rows = [head]
        for c, name in enumerate(CLASSES):
            extra = f" {other.per_class[c]:8.4f}" if other else ""
            rows.append(f"{name:<12} {self.per_class[c]:8.4f}{extra}")
        extra = f" {other.mean:8.4f}" if other else ""
        rows.append(f"{'mean':<12} {self.mean:8.4f}{extra}")
        return "\n".join(rows)

    def format_compact(self, columns: int = 4) -> str:
        """Per-class Dice in a few columns (for logs), then the mean."""
        cells = [f"{name:<11}{v:.4f}" for name, v in zip(CLASSES, self.per_class, strict=True)]
        rows = ["   ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
        return "\n".join([*rows, f"mean Dice {self.mean:.4f} over {self.n_images} images"])


def summarize(dice: np.ndarray) -> DiceTable:
    """(N images, C classes) Dice values -> per-class means and their mean."""
    dice = np.asarray(dice, np.float64)
    return DiceTable(dice.mean(axis=0), dice.shape[0])


class DiceAccumulator:
    """Running sum of per-(image, class) Dice on a device; reduce across ranks with DDP.

    The pixel counts (intersection, |pred|, |truth|) per class are summed too, for the
    metrics that pool pixels over images (``Scores``).
    """

    def __init__(self, num_classes: int = len(CLASSES), device: torch.device | str = "cpu"):
        self.sum = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.pixels = torch.zeros(3, num_classes, dtype=torch.float64, device=device)

    def update(self, inter: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add counts of shape (B, C) or (C,)."""
        d = dice_from_counts_torch(inter, pred, gt).to(self.sum.device).reshape(-1, len(self.sum))
        self.sum += d.sum(0)
        self.count += d.shape[0]
        for row, c in zip(self.pixels, (inter, pred, gt), strict=True):
            row += c.to(self.pixels).reshape(-1, len(self.sum)).sum(0)

    def all_reduce(self) -> None:
        all_reduce_sum(self.sum, self.count, self.pixels)

    def compute(self) -> DiceTable:
        n = int(self.count.item())
        return DiceTable((self.sum / max(n, 1)).cpu().numpy(), n)

    def scores(self, loss: float) -> Scores:
        """What the pass measured, with its mean ``loss``, for the ``METRICS``."""
        inter, pred, gt = self.pixels.cpu().numpy()
        return Scores(loss, self.compute(), inter, pred, gt)


@dataclass
class Scores:
    """What a validation pass measured: the input of every metric function."""

    loss: float  # mean loss over the batches, at the model's resolution
    table: DiceTable  # competition Dice per class (means over images) and ``n_images``
    inter: np.ndarray  # (C,) |pred & truth| pixels at source size, summed over images
    pred: np.ndarray  # (C,) |pred| pixels
    gt: np.ndarray  # (C,) |truth| pixels


Metric = Callable[[Scores], float]

# name -> metric; validation returns each (in this order), the summary log as val_<name>
METRICS: Registry[Metric] = Registry("validation metric", "metrics")


def register_metric(name: str, fn: Metric | None = None, *, replace: bool = False):
    """Add the validation metric ``name``: ``register_metric(name, fn)``, or
    ``@register_metric(name)`` over ``fn(scores: Scores) -> float``. Returns ``fn``.

    Validation then returns it and ``summary.csv`` (TensorBoard, W&B) logs it as
    ``val_<name>``. A name already registered is refused (``ValueError``) unless
    ``replace=True``.
    """
    return METRICS.register(name, fn, replace=replace)


def compute_metrics(scores: Scores) -> dict[str, float]:
    """Every registered metric of ``scores``: a flat dict name -> float."""
    return {name: float(fn(scores)) for name, fn in METRICS.items()}


@register_metric("loss")
def _loss(s: Scores) -> float:
    return s.loss


@register_metric("dice")
def _dice(s: Scores) -> float:
    """The competition score: mean over classes of the per-class mean Dice (NaN without
    images)."""
    return s.table.mean if s.table.n_images else float("nan")
