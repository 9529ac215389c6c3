"""The wrist angle of a hand X-ray: how far the hand is turned against the forearm.

The hand's axis is the third (middle) metacarpal's, the forearm's the mean of the radius's
and the ulna's axes; each axis is the principal axis of the bone's area, from its second
moments (``cv2.moments``, of a polygon or of a mask alike). Both are oriented from the
forearm towards the hand. The angle is signed, positive when the hand is turned towards
the ulna (ulnar deviation), whatever the side (left, right, mirrored) and the rotation on
the detector, since the ulna's side is read from the image too.

Stratified folds (``data.fold_stratify: wrist_angle``) bin its magnitude (``BIN_EDGES``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from bonecomp.classes import CLASS_TO_INDEX
from bonecomp.data.annotations import AnnotationError, Polygons, load_annotation

RADIUS, ULNA = CLASS_TO_INDEX["Radius"], CLASS_TO_INDEX["Ulna"]
MIDDLE_METACARPAL = CLASS_TO_INDEX["finger-11"]  # classes.FINGERS[1][-1]
ANGLE_CLASSES: tuple[int, ...] = (RADIUS, ULNA, MIDDLE_METACARPAL)

# Bins of |wrist angle| (degrees): straight below 10, bent 10-20, strongly bent from 20.
# Hands held flat on the detector scatter by a few degrees; the bent test hands of the
# real data reach 20-30.
# Bins 1 and 2 are merged into one (BENT_NAME) when either has fewer patients than folds.
BIN_EDGES: tuple[float, ...] = (10.0, 20.0)
BIN_NAMES: tuple[str, ...] = ("straight (<10°)", "bent (10-20°)", "strongly bent (>=20°)")
BENT_NAME = "bent (>=10°)"


def _axis(m: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Centroid and unit principal axis of an area from its moments (None when empty)."""
    if m["m00"] <= 0:
        return None
    centre = np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])
    theta = 0.5 * math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"])
    return centre, np.array([math.cos(theta), math.sin(theta)])


def angle_from_moments(moments: Mapping[int, Mapping[str, float]]) -> float:
    """Signed wrist angle (degrees) from the moments of ``ANGLE_CLASSES``; nan when one
    of those bones has no area."""
    axes = [_axis(moments[c]) for c in ANGLE_CLASSES]
    if any(a is None for a in axes):
        return math.nan
    (r_c, r_d), (u_c, u_d), (h_c, h_d) = axes  # type: ignore[misc]
    distal = h_c - (r_c + u_c) / 2  # from the forearm towards the hand

    def oriented(d: np.ndarray) -> np.ndarray:
        return d if d @ distal >= 0 else -d

    forearm = oriented(r_d) + oriented(u_d)
    forearm /= np.linalg.norm(forearm)
    hand = oriented(h_d)
    cross = float(forearm[0] * hand[1] - forearm[1] * hand[0])
    angle = math.degrees(math.atan2(cross, float(forearm @ hand)))
    ulnar = u_c - r_c  # towards the ulna, across the forearm
    side = forearm[0] * ulnar[1] - forearm[1] * ulnar[0]
    return angle if side >= 0 else -angle


def wrist_angle(polygons: Polygons | Sequence[np.ndarray]) -> float:
    """Signed wrist angle (degrees) of one image's 29 polygons (class order)."""
    moments = {
        c: cv2.moments(np.asarray(polygons[c], np.float32).reshape(-1, 1, 2)) for c in ANGLE_CLASSES
    }
    return angle_from_moments(moments)


def wrist_angle_of_masks(masks: Mapping[int, np.ndarray]) -> float:
    """Signed wrist angle (degrees) from binary masks of ``ANGLE_CLASSES`` (class index ->
    (H, W) mask), e.g. predicted ones; nan when a bone is not predicted."""
    moments = {c: cv2.moments(masks[c].astype(np.uint8), binaryImage=True) for c in ANGLE_CLASSES}
    return angle_from_moments(moments)


def angle_bin(angle: float) -> int:
    """The ``BIN_EDGES`` bin of a wrist angle's magnitude (an unmeasurable hand: 0)."""
    return 0 if math.isnan(angle) else int(np.searchsorted(BIN_EDGES, abs(angle), side="right"))


def table_angles(df: pd.DataFrame) -> pd.Series:
    """Wrist angle of every training image of a layout table (its ``json_path``), indexed
    by ``rel``: milliseconds per JSON, no pixels. An unreadable annotation is nan: the
    cache build reports or skips it (``data.on_bad_image``)."""
    return pd.Series(
        [_file_angle(p) for p in df["json_path"]],
        index=df["rel"].to_numpy(),
        name="wrist_angle",
        dtype=float,
    )


def _file_angle(path: str) -> float:
    try:
        return wrist_angle(load_annotation(path))
    except AnnotationError:
        return math.nan
