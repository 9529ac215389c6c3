"""The carpal crop box: one geometry for training (from the polygons) and inference (from
the first stage's carpal pixels), so a crop model sees at test time what it learnt on.

A box is ``(y0, y1, x0, x1)``, half-open, in source pixels. The rule: the bounding box of
the eight carpal bones, made square on its longer side, grown by ``margin`` x side on
every side, moved (not cut) to lie inside the image; only a square larger than the image
is cut to it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd

from bonecomp.classes import CARPALS
from bonecomp.data.annotations import Polygons

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in source pixels, half-open
# A crop cache's index.csv (and its runs' oof_index.csv) holds each image's box here.
BOX_COLUMNS = ("box_y0", "box_y1", "box_x0", "box_x1")


def index_boxes(index: pd.DataFrame) -> list[Box] | None:
    """Each row's crop box of such an index table; None for whole images (no box columns)."""
    if BOX_COLUMNS[0] not in index.columns:
        return None
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in index[list(BOX_COLUMNS)].to_numpy()]


def square_box(
    y0: float, y1: float, x0: float, x1: float, hw: tuple[int, int], margin: float
) -> Box:
    """The crop box around ``[y0, y1) x [x0, x1)`` (see the module docstring)."""
    H, W = hw
    side = math.ceil(max(y1 - y0, x1 - x0, 1) * (1 + 2 * margin))
    out = []
    for lo, hi, n in ((y0, y1, H), (x0, x1, W)):
        s = min(side, n)
        start = min(max(round((lo + hi - s) / 2), 0), n - s)
        out += [start, start + s]
    return out[0], out[1], out[2], out[3]


def truth_box(polygons: Polygons, hw: tuple[int, int], margin: float) -> Box:
    """The crop box of an annotated image: from its carpal polygons' points."""
    pts = np.concatenate([np.asarray(polygons[c]).reshape(-1, 2) for c in CARPALS])
    if len(pts) == 0:
        return 0, hw[0], 0, hw[1]
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0) + 1
    return square_box(float(y0), float(y1), float(x0), float(x1), hw, margin)


def grid_box(flags: np.ndarray, hw: tuple[int, int], margin: float) -> Box | None:
    """The crop box of carpal pixels ``flags`` (h, w) bool on a model's grid, mapped to the
    source frame ``hw`` (a grid pixel covers ``H / h`` source rows); None when none is set."""
    rows, cols = np.flatnonzero(flags.any(1)), np.flatnonzero(flags.any(0))
    if len(rows) == 0:
        return None
    (h, w), (H, W) = flags.shape, hw
    y0, y1 = rows[0] * H / h, (rows[-1] + 1) * H / h
    x0, x1 = cols[0] * W / w, (cols[-1] + 1) * W / w
    return square_box(y0, y1, x0, x1, hw, margin)


def crop_image(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The box of a source image resized to ``size`` x ``size`` (INTER_AREA, as the cache)."""
    y0, y1, x0, x1 = box
    part = image[y0:y1, x0:x1]
    if part.shape == (size, size):
        return np.ascontiguousarray(part)
    return np.ascontiguousarray(cv2.resize(part, (size, size), interpolation=cv2.INTER_AREA))


def crop_polygons(polygons: Polygons, box: Box) -> Polygons:
    """Polygons in the box's frame (points may fall outside it; drawing clips them)."""
    shift = np.array([box[2], box[0]], np.int32)
    return Polygons(np.ascontiguousarray(polygons.points - shift, np.int32), polygons.offsets)
