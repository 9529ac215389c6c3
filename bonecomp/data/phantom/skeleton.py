"""A posed hand's 29 bone outlines and the soft tissue around them, in millimetres.

Long bones are shafts with flared, rounded ends; carpals are perturbed super-ellipses.
Bones are pulled back along rays from their own centre (line) so that neighbours keep a
small joint gap and every outline stays simple; Trapezium/Trapezoid and
Triquetrum/Pisiform are not separated, and the pairs of ``OVERLAP_MM`` (most of them in the
carpus) reach into each other, so bones overlap as in the real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bonecomp.classes import CARPALS, FOREARM, NUM_CLASSES
from bonecomp.data.phantom.anatomy import (
    CAPS,
    CARVE_GAP,
    DIGIT_CLASSES,
    FOREARM_CAPS,
    FOREARM_LENGTH,
    JOINT_GAP,
    OVERLAP_MM,
    OVERLAPS,
    PIVOT,
    TISSUE_PAD,
    Anatomy,
    Pose,
)
from bonecomp.data.phantom.geometry import carve, ray_limit, split_limit, turn, unit


@dataclass(frozen=True)
class Segment:
    """A long bone: base point and unit direction (towards its head), length and widths."""

    base: np.ndarray
    direction: np.ndarray
    length: float
    widths: tuple[float, float, float]  # base, shaft, head
    caps: tuple[tuple[float, float], tuple[float, float]]
    tilt: float = 0.0  # degrees; tilts the head's end line (radial styloid)


def build_skeleton(anatomy: Anatomy, pose: Pose) -> tuple[list[np.ndarray], dict]:
    """The 29 posed bone outlines (class order, mm) and the soft-tissue geometry around them.

    Long bones are built first, each carved clear of those before it. Carpals are then split
    from each other along straight joint lines (no bone is favoured) and carved clear of the
    long bones. The tissue dict holds point clouds ``palm``, ``forearm`` and ``hand`` (every
    bone but the forearm) and ``strokes`` (one per digit bone: start, end, thickness).
    """
    segments = _forearm_segments(anatomy) | _digit_segments(anatomy, pose)
    metacarpals = [d[0] for d in DIGIT_CLASSES]
    phalanges = [c for d in DIGIT_CLASSES for c in d[1:]]
    outlines: dict[int, np.ndarray] = {}
    for c in [*FOREARM, *metacarpals[2:], *metacarpals[:2], *phalanges]:
        points, origins = _long_bone(segments[c])
        outlines[c] = carve(points, origins, _clear_of(c, origins, points, outlines, anatomy))
    long_bones = dict(outlines)
    blobs = {
        c: _carpal(anatomy.carpals[k], anatomy.carpal_shapes[k], pose.wrist)
        for k, c in enumerate(CARPALS)
    }
    for c, (points, centre) in blobs.items():
        neighbours = {
            b: blob for b, blob in blobs.items() if b != c and frozenset((b, c)) not in OVERLAPS
        }
        limit = _clear_of(c, centre, points, long_bones, anatomy)
        for b, (other, other_centre) in neighbours.items():
            gap = _gap(b, c, anatomy)
            limit = np.minimum(limit, split_limit(points, centre, [(other, other_centre)], gap))
        outlines[c] = carve(points, centre, limit)
    hand = [c for c in range(NUM_CLASSES) if c not in FOREARM]
    thumb_base = segments[metacarpals[0]]
    tissue = {
        "palm": np.concatenate(
            [*(outlines[c] for c in (*CARPALS, *metacarpals[1:])), _thenar(thumb_base)]
        ),
        "forearm": np.concatenate([outlines[c] for c in FOREARM]),
        "strokes": _tissue_strokes(segments, anatomy.tissue),
        "hand": np.concatenate([outlines[c] for c in hand]),
    }
    return [outlines[c] for c in range(NUM_CLASSES)], tissue


def _gap(a: int, b: int, anatomy: Anatomy) -> float:
    """Joint gap between two bones (mm); negative where they overlap by that much."""
    depth = OVERLAP_MM.get(frozenset((a, b)))
    return CARVE_GAP if depth is None else -depth * anatomy.packing


def _clear_of(
    c: int,
    origins: np.ndarray,
    points: np.ndarray,
    obstacles: dict[int, np.ndarray],
    anatomy: Anatomy,
) -> np.ndarray:
    """How far each outline point of bone ``c`` may reach, given the bones already placed."""
    apart = [o for b, o in obstacles.items() if frozenset((b, c)) not in OVERLAP_MM]
    limit = ray_limit(origins, points, apart, CARVE_GAP)  # one call: the common case
    for b, outline in obstacles.items():
        if frozenset((b, c)) in OVERLAP_MM:
            limit = np.minimum(limit, ray_limit(origins, points, [outline], _gap(b, c, anatomy)))
    return limit


def _forearm_segments(anatomy: Anatomy) -> dict[int, Segment]:
    """Radius and ulna, from below the image up to their distal ends; they do not bend."""
    segments = {}
    for c, row, caps in zip(FOREARM, anatomy.forearm, FOREARM_CAPS, strict=True):
        top_x, top_y, bottom_x, head_w, shaft_w, tilt = row
        top = np.array([top_x, top_y])
        base = np.array([bottom_x, top_y - FOREARM_LENGTH])
        direction = (top - base) / np.linalg.norm(top - base)
        widths = (shaft_w, shaft_w, head_w)
        segments[c] = Segment(base, direction, FOREARM_LENGTH, widths, caps, tilt)
    return segments


def _digit_segments(anatomy: Anatomy, pose: Pose) -> dict[int, Segment]:
    """Chain each digit's bones from its metacarpal base, turning at the joints."""
    angles = _digit_angles(anatomy, pose)
    segments = {}
    for d, classes in enumerate(DIGIT_CLASSES):
        point = turn(anatomy.digit_roots[d, :2], pose.wrist, PIVOT)
        for k, c in enumerate(classes):
            length, *widths = anatomy.digit_bones[d][k]
            direction = unit(angles[d][k])
            kind = "metacarpal" if k == 0 else "distal" if k == len(classes) - 1 else "phalanx"
            segments[c] = Segment(point, direction, length, tuple(widths), CAPS[kind])
            point = point + (length + JOINT_GAP) * direction
    return segments


def _digit_angles(anatomy: Anatomy, pose: Pose) -> list[np.ndarray]:
    """Direction of every digit bone (degrees from +y, positive towards the little finger).

    Each finger bone points further towards the little finger than the same bone of the
    finger before it (metacarpals by at least 4 degrees, phalanges by 1), so neighbouring
    fingers never converge and cross.
    """
    angles = []
    for d, bones in enumerate(anatomy.digit_bones):
        angle, spread, curl = anatomy.digit_roots[d, 2:]
        turns = np.full(len(bones), curl)
        turns[:2] = angle + pose.wrist + (pose.thumb if d == 0 else 0.0), spread * pose.spread
        angles.append(np.cumsum(turns) + pose.joints[d])
    for d in range(2, len(angles)):
        angles[d] = np.maximum(angles[d], angles[d - 1] + np.array([4.0, 1.0, 1.0, 1.0]))
    return angles


def _long_bone(seg: Segment, n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Outline of a long bone and, per point, the point on its centre line it is seen from.

    The width flares from the shaft towards both ends over about one end width; the ends are
    super-elliptic caps (flat-ish bases, round heads).
    """
    base_w, shaft_w, head_w = seg.widths
    (base_depth, base_p), (head_depth, head_p) = seg.caps
    length = seg.length
    a = length * (1 - np.cos(np.linspace(0, np.pi, n))) / 2
    width = (
        shaft_w
        + (base_w - shaft_w) * np.exp(-((a / base_w) ** 2))
        + (head_w - shaft_w) * np.exp(-(((length - a) / head_w) ** 2))
    )
    lo, hi = base_depth * base_w / 2, length - head_depth * head_w / 2
    half = width / 2 * _cap(a / lo, base_p) * _cap((length - a) / (length - hi), head_p)
    axial = np.concatenate([a, a[-2:0:-1]])
    lateral = np.concatenate([half, -half[-2:0:-1]])
    if seg.tilt:
        ramp = np.clip((axial - (length - head_w)) / head_w, 0, 1)
        axial = axial - np.tan(np.radians(seg.tilt)) * lateral * ramp
    normal = np.array([seg.direction[1], -seg.direction[0]])
    points = seg.base + axial[:, None] * seg.direction + lateral[:, None] * normal
    seen_from = np.clip(np.concatenate([a, a[-2:0:-1]]), lo, hi)
    origins = seg.base + seen_from[:, None] * seg.direction
    return points, origins


def _cap(u: np.ndarray, p: float) -> np.ndarray:
    """Super-elliptic end profile: 0 at the end (u = 0), 1 from u >= 1 on."""
    return (1 - (1 - np.clip(u, 0, 1)) ** p) ** (1 / p)


def _carpal(
    row: np.ndarray, shape: np.ndarray, wrist: float, n: int = 160
) -> tuple[np.ndarray, np.ndarray]:
    """Outline and centre of a carpal: a bumpy super-ellipse, turned with its row."""
    cx, cy, long_axis, short_axis, angle, distal_row = row
    angle_turn = wrist if distal_row else wrist / 2
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    p = shape[0]
    radius = (
        np.abs(np.cos(theta) / (long_axis / 2)) ** p + np.abs(np.sin(theta) / (short_axis / 2)) ** p
    ) ** (-1 / p)
    k = np.arange(2, 5)[:, None]
    bumps = shape[1:4, None] * np.cos(k * theta) + shape[4:7, None] * np.sin(k * theta)
    radius *= 1 + bumps.sum(0)
    phi = theta + np.radians(angle - angle_turn)
    centre = turn(np.array([cx, cy]), angle_turn, PIVOT)
    points = centre + radius[:, None] * np.column_stack([np.cos(phi), np.sin(phi)])
    return points, centre


def _tissue_strokes(
    segments: dict[int, Segment], tissue: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Soft tissue of the digits: one thick round-capped stroke per bone (mm), padded by
    ``tissue`` times the reference finger padding."""
    strokes = []
    for classes in DIGIT_CLASSES:
        for c in classes:
            seg = segments[c]
            end = seg.base + seg.direction * (seg.length - 1.5)
            thickness = max(seg.widths) + 2 * TISSUE_PAD["finger"] * tissue
            strokes.append((seg.base, end, thickness))
    return strokes


def _thenar(thumb_metacarpal: Segment) -> np.ndarray:
    """Points of the thenar web: the palm reaches halfway up the thumb metacarpal."""
    seg = thumb_metacarpal
    return seg.base + np.outer([0.0, 0.5], seg.direction) * seg.length
