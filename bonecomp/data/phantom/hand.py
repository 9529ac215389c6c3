"""One hand from anatomy and pose to pixels: build the skeleton, place it in the frame, render.

The ground-truth polygons are exactly the integer polygons the bones are filled with, so
labels match pixels; artefacts (metal, text) are drawn but never labelled. Images show a
right hand with its thumb on the left.
"""

from __future__ import annotations

import numpy as np

from bonecomp.data.phantom.anatomy import PIVOT, REF_SIZE, TISSUE_PAD, Anatomy, Pose
from bonecomp.data.phantom.artefacts import Artefacts, metal_shapes
from bonecomp.data.phantom.geometry import clip_to_square, perimeter, resample
from bonecomp.data.phantom.render import Acquisition, render
from bonecomp.data.phantom.skeleton import build_skeleton


def draw_hand(
    anatomy: Anatomy,
    pose: Pose,
    size: int,
    rng: np.random.Generator,
    look: Acquisition,
    artefacts: Artefacts | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one hand: the uint8 image and its 29 integer polygons (class order)."""
    artefacts = artefacts or Artefacts()
    outlines, tissue = build_skeleton(anatomy, pose)
    matrix, offset, px_per_mm = _placement(tissue["hand"], pose, size)

    def to_px(points: np.ndarray) -> np.ndarray:
        return points @ matrix.T + offset

    polygons = [_finalize(to_px(o), size) for o in outlines]
    tissue_px = {
        "hulls": [
            (to_px(tissue["palm"]), TISSUE_PAD["palm"] * anatomy.tissue * px_per_mm),
            (to_px(tissue["forearm"]), TISSUE_PAD["forearm"] * anatomy.tissue * px_per_mm),
        ],
        "strokes": [(to_px(a), to_px(b), t * px_per_mm) for a, b, t in tissue["strokes"]],
    }
    metal = [
        (to_px(p), level) for p, level in metal_shapes(artefacts, anatomy, tissue["strokes"], rng)
    ]
    image = render(
        polygons,
        tissue_px,
        size,
        px_per_mm,
        anatomy.density,
        pose.mirrored,
        rng,
        look,
        metal,
        artefacts.texts,
    )
    return image, polygons


def _placement(hand: np.ndarray, pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The mm-to-pixel map: mirror, rotate, scale, then fit the hand inside the frame.

    The hand (all bones but the forearm, plus soft tissue) is shrunk if it would not fit, then
    placed ``pose.top`` below the top edge with the wrist at ``pose.centre`` of the width, as
    far as the hand stays inside the frame.
    """
    px_per_mm = pose.zoom * size / REF_SIZE
    a = np.radians(pose.rotation)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    flip = np.diag([-1.0 if pose.mirrored else 1.0, -1.0])  # image y points down
    matrix = rot @ flip
    pad = TISSUE_PAD["palm"]
    lo, hi = (hand @ matrix.T).min(0) - pad, (hand @ matrix.T).max(0) + pad
    extent = hi - lo
    fit = min(1.0, 0.94 * size / (extent[0] * px_per_mm), 0.9 * size / (extent[1] * px_per_mm))
    px_per_mm *= fit
    margin = 0.02 * size
    wrist_x = pose.centre * size - (PIVOT @ matrix.T)[0] * px_per_mm
    left, right = margin - lo[0] * px_per_mm, size - margin - hi[0] * px_per_mm
    offset = np.array([np.clip(wrist_x, left, right), pose.top * size - lo[1] * px_per_mm])
    return matrix * px_per_mm, offset, px_per_mm


def _finalize(points: np.ndarray, size: int) -> np.ndarray:
    """Clip an outline (pixels) to the frame, resample it evenly, round to distinct ints."""
    clipped = clip_to_square(points, size - 1)
    n = int(np.clip(round(perimeter(clipped) * REF_SIZE / size / 8), 40, 240))
    poly = np.clip(np.rint(resample(clipped, n)), 0, size - 1).astype(np.int32)
    poly = poly[np.any(poly != np.roll(poly, 1, axis=0), axis=1)]
    if len(np.unique(poly, axis=0)) < 3:
        raise RuntimeError("a bone collapsed to fewer than 3 distinct points")
    return poly
