"""Where a training patch is cut (``data.patch_size``): nnU-Net-style foreground sampling.

A share of patches (``data.patch_foreground``) is centred near a bone drawn with a
per-class weight, so small and rare bones (carpals, fingertips) are seen more often than
in blind crops; the rest are placed uniformly. Weights (``data.patch_balance``):
``area`` gives each class ``1 / sqrt(mean area)`` over the training images (a bone 4x
smaller is chosen 2x more often; the square root keeps the big bones in view), ``uniform``
gives every present class the same chance. The dataset draws the masks of the patch only
(``data.rasterize`` at the patch's origin), never the full-size masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import numpy as np

from bonecomp.config import PatchBalance
from bonecomp.data.annotations import Polygons

BALANCES: tuple[str, ...] = get_args(PatchBalance)


def polygon_areas(polys: Polygons) -> np.ndarray:
    """(C,) shoelace area of each class's polygon, in source pixels (0 when absent)."""
    out = np.zeros(len(polys), np.float64)
    for c in range(len(polys)):
        p = polys[c].astype(np.float64)
        if len(p) >= 3:
            x, y = p[:, 0], p[:, 1]
            out[c] = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return out


def class_weights(areas: np.ndarray, balance: str = "area") -> np.ndarray:
    """(C,) sampling weight per class from (N, C) areas of the training images (area
    relative to each image's size); classes never present get 0."""
    if balance not in BALANCES:
        raise ValueError(f"data.patch_balance must be one of {BALANCES}, got {balance!r}")
    areas = np.asarray(areas, np.float64)
    present = (areas > 0).sum(0)
    mean = np.where(present > 0, areas.sum(0) / np.maximum(present, 1), 0.0)
    if balance == "uniform":
        return (mean > 0).astype(np.float64)
    return np.where(mean > 0, 1.0 / np.sqrt(np.where(mean > 0, mean, 1.0)), 0.0)


@dataclass
class PatchSampler:
    """Draws the top-left corner (y0, x0) of a ``size`` square patch of a ``side`` image."""

    size: int
    foreground: float = 0.33
    weights: np.ndarray | None = None  # (C,) per class; None: uniform over present classes

    def origin(
        self,
        side: int,
        points: np.ndarray,
        offsets: Sequence[int],
        rng: np.random.Generator,
    ) -> tuple[tuple[int, int], int | None]:
        """((y0, x0), the class the patch is centred on or None for a uniform one).

        ``points`` are the polygons in the image's frame (after augmentation), class c's
        outline ``points[offsets[c]:offsets[c + 1]]``. The centre is a random point
        between the bone's vertex mean and one of its vertices, so it lies on or inside
        the bone for convex shapes; the patch is then moved inside the image.
        """
        span = side - self.size
        if span < 0:
            raise ValueError(f"patch of {self.size} px does not fit a {side} px image")
        chosen = None
        if self.foreground > 0 and rng.random() < self.foreground:
            chosen = self._pick_class(points, offsets, side, rng)
        if chosen is None:
            return (int(rng.integers(0, span + 1)), int(rng.integers(0, span + 1))), None
        pts = points[offsets[chosen] : offsets[chosen + 1]]
        centre = pts.mean(0)
        vertex = pts[rng.integers(len(pts))]
        cx, cy = centre + rng.random() * (vertex - centre)
        half = self.size / 2
        y0 = int(np.clip(round(cy - half), 0, span))
        x0 = int(np.clip(round(cx - half), 0, span))
        return (y0, x0), chosen

    def _pick_class(
        self, points: np.ndarray, offsets: Sequence[int], side: int, rng: np.random.Generator
    ) -> int | None:
        """A class with a polygon whose vertex mean lies in the image, drawn by weight."""
        n = len(offsets) - 1
        w = np.ones(n) if self.weights is None else np.asarray(self.weights, np.float64).copy()
        counts = np.diff(np.asarray(offsets))
        padded = np.vstack([np.asarray(points, np.float64).reshape(-1, 2), np.zeros((1, 2))])
        # reduceat sums each class's run (an empty one gives one row: masked below)
        sums = np.add.reduceat(padded, np.asarray(offsets[:-1]), axis=0)
        means = sums / np.maximum(counts, 1)[:, None]
        inside = ((means >= 0) & (means < side)).all(1)
        w[(counts < 3) | ~inside] = 0.0  # absent, or moved out of the image by the augmentation
        total = w.sum()
        if total <= 0:
            return None
        return int(rng.choice(n, p=w / total))
