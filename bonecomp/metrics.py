"""The competition Dice, computed from counts.

Per (image, class): (2|A∩B| + 1e-4) / (|A| + |B| + 1e-4) on the full-size masks, so an
empty prediction of an empty truth scores 1. Averaged over images for each class, then
over classes. Counts (intersection, |A|, |B|) come first, so a validation loop can
accumulate them batch by batch on any device without keeping masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from bonecomp.classes import CLASSES
from bonecomp.distributed import all_reduce_sum

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
    """Running sum of per-(image, class) Dice on a device; reduce across ranks with DDP."""

    def __init__(self, num_classes: int = len(CLASSES), device: torch.device | str = "cpu"):
        self.sum = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, inter: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add counts of shape (B, C) or (C,)."""
        d = dice_from_counts_torch(inter, pred, gt).to(self.sum.device).reshape(-1, len(self.sum))
        self.sum += d.sum(0)
        self.count += d.shape[0]

    def all_reduce(self) -> None:
        all_reduce_sum(self.sum, self.count)

    def compute(self) -> DiceTable:
        n = int(self.count.item())
        return DiceTable((self.sum / max(n, 1)).cpu().numpy(), n)
