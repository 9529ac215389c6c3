"""The phantom's hand: reference bone sizes and placement, and how patients and poses vary.

The skeleton is parametric, in millimetres, for a right hand seen palm down (PA view):
``x`` points towards the little finger, ``y`` towards the fingertips. A patient
(``Anatomy``) is the reference scaled and jittered; each of its two hands gets a ``Pose``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bonecomp.classes import CARPALS, FINGERS, FOREARM, NUM_CLASSES, THUMB

REF_SIZE = 2048  # sizes and point spacings are defined at the competition resolution

# --- Reference anatomy (mm, right hand, x towards the little finger, y towards the fingertips)

# Digits in the order thumb, index, middle, ring, little; bones from the metacarpal outwards.
DIGIT_CLASSES: tuple[tuple[int, ...], ...] = tuple(tuple(reversed(d)) for d in (THUMB, *FINGERS))
# Per digit: metacarpal base x, y; metacarpal direction; turn at the MCP joint per unit of
# finger spread; turn at each later joint (degrees, positive towards the little finger).
_DIGIT_ROOTS = np.array(
    [
        [-24.0, 16.0, -30.0, -4.0, 7.0],
        [-12.0, 22.5, -7.0, -4.0, 1.5],
        [0.0, 21.5, 0.0, 0.0, 0.0],
        [11.0, 20.5, 5.5, 4.0, -1.5],
        [21.0, 18.0, 12.0, 8.0, -3.0],
    ]
)
# Per digit and bone: length, base width, shaft width, head width (mm).
_DIGIT_BONES: tuple[tuple[tuple[float, ...], ...], ...] = (
    ((46, 13, 9, 13), (31, 13, 8.5, 10.5), (22, 11, 6.5, 8)),
    ((67, 10.5, 8, 12.5), (40, 11.5, 8, 10), (23, 9.5, 7, 8.5), (17, 8.5, 5, 6.5)),
    ((64, 10.5, 8.5, 13), (45, 11.5, 8.5, 10.5), (28, 10, 7.5, 9), (18, 9, 5.5, 6.5)),
    ((58, 9, 7.5, 12), (42, 11, 8, 10), (26, 9.5, 7, 8.5), (17.5, 8.5, 5, 6.5)),
    ((54, 9, 7, 11), (33, 10.5, 7, 9), (19, 9, 6, 7.5), (16, 7.5, 4.5, 6)),
)
# End shapes (depth as a fraction of the half width, super-ellipse exponent) for the base and
# head of a metacarpal, a proximal or middle phalanx, and a distal phalanx.
CAPS = {
    "metacarpal": ((0.35, 4.0), (0.8, 2.0)),
    "phalanx": ((0.3, 4.0), (0.6, 2.5)),
    "distal": ((0.3, 4.0), (0.95, 2.0)),
}
# Carpals in CARPALS order: centre x, y, long and short axis, long-axis angle (degrees,
# counter-clockwise from +x), row (1 distal: turns with the hand, 0 proximal: half as much).
_CARPALS = np.array(
    [
        [-21.5, 9.0, 18.0, 15.0, 35.0, 1],
        [-11.0, 12.5, 14.5, 12.0, 80.0, 1],
        [0.0, 8.5, 26.0, 15.0, 90.0, 1],
        [12.0, 9.5, 21.5, 15.5, 75.0, 1],
        [-15.5, -3.0, 27.5, 14.0, 120.0, 0],
        [-2.5, -6.5, 18.0, 17.0, 90.0, 0],
        [10.5, -2.5, 17.0, 13.0, 35.0, 0],
        [14.0, -0.5, 11.0, 10.0, 60.0, 0],
    ]
)
# Radius and ulna: distal top x, y; proximal x; head and shaft width; head tilt (degrees,
# positive raises the thumb side: the radial styloid).
_FOREARM = np.array(
    [
        [-14.0, -10.5, -7.0, 29.0, 15.0, 15.0],
        [5.0, -15.0, 16.0, 14.0, 11.0, -10.0],
    ]
)
FOREARM_LENGTH = 320.0  # long enough to leave the image at the bottom
FOREARM_CAPS = (((0.3, 4.0), (0.25, 3.0)), ((0.3, 4.0), (0.6, 2.0)))
PIVOT = np.array([0.0, -2.0])  # centre of the capitate head: the wrist bends about it
_TRAPEZIUM, _TRAPEZOID, _CAPITATE, _HAMATE, _SCAPHOID, _LUNATE, _TRIQUETRUM, _PISIFORM = CARPALS
_RADIUS, _ULNA = FOREARM
_MC = tuple(d[-1] for d in (THUMB, *FINGERS))  # metacarpals: thumb, index, middle, ring, little
# Bones that lie on each other in a PA view. Trapezium/Trapezoid and Triquetrum/Pisiform are
# never carved apart (the pisiform sits on the palmar face of the triquetrum); the other
# pairs share a joint seen obliquely, so each bone reaches this far (mm, at packing 1) past
# the joint line into its neighbour. Calibrated so that about 0.4 % of the image pixels
# carry two labels, most of them in the carpus, as in the real data (docs/data.md).
OVERLAPS = frozenset({frozenset((_TRAPEZIUM, _TRAPEZOID)), frozenset((_TRIQUETRUM, _PISIFORM))})
OVERLAP_MM: dict[frozenset[int], float] = {
    frozenset(pair): depth
    for pair, depth in (
        ((_CAPITATE, _HAMATE), 2.8),
        ((_TRAPEZOID, _CAPITATE), 2.5),
        ((_SCAPHOID, _TRAPEZIUM), 4.0),
        ((_SCAPHOID, _TRAPEZOID), 2.2),
        ((_SCAPHOID, _CAPITATE), 2.5),
        ((_SCAPHOID, _LUNATE), 3.5),
        ((_LUNATE, _CAPITATE), 4.0),
        ((_LUNATE, _TRIQUETRUM), 3.0),
        ((_HAMATE, _TRIQUETRUM), 4.0),
        ((_HAMATE, _PISIFORM), 3.5),
        ((_MC[1], _TRAPEZOID), 1.5),
        ((_MC[2], _CAPITATE), 1.5),
        ((_MC[3], _HAMATE), 1.5),
        ((_MC[4], _HAMATE), 1.5),
        ((_MC[1], _MC[2]), 0.8),
        ((_MC[2], _MC[3]), 0.8),
        ((_MC[3], _MC[4]), 0.8),
        ((_RADIUS, _ULNA), 2.0),
    )
}
JOINT_GAP = 1.8  # mm between consecutive bones of a digit
CARVE_GAP = 1.5  # mm kept between bones that are carved apart
CORTEX_MM = tuple(1.0 if c in CARPALS else 1.8 for c in range(NUM_CLASSES))
TISSUE_PAD = {"finger": 4.5, "palm": 7.0, "forearm": 9.0}  # soft tissue around bones (mm)
# Wrist bends (hand turned against the forearm about PIVOT): chance per hand and range of the
# bend (degrees). About 11 % of the real training hands are bent but 55 % of the test hands,
# and the test ones further: training differs from test.
BENT_TRAIN = (0.11, 8.0, 18.0)
BENT_TEST = (0.55, 12.0, 28.0)
# make_phantom(bent_patients=k): those training patients bend both wrists this far (chance 1),
# the others hold both straight: bent hands concentrated in a few patients.
BENT_CONCENTRATED = (1.0, 18.0, 30.0)  # radial bends (x 0.7) still >= 12.6


@dataclass(frozen=True)
class Anatomy:
    """One patient's skeleton and habits, shared by both hands."""

    digit_roots: np.ndarray  # like _DIGIT_ROOTS, jittered
    digit_bones: tuple[np.ndarray, ...]  # per digit (n_bones, 4), scaled
    carpals: np.ndarray  # like _CARPALS, jittered
    carpal_shapes: np.ndarray  # (8, 7): super-ellipse exponent, Fourier terms 2..4
    forearm: np.ndarray  # like _FOREARM, scaled
    zoom: float  # pixels per mm at REF_SIZE
    spread: float  # habitual finger spread
    thumb: float  # habitual thumb abduction offset (degrees)
    density: float  # bone density factor (osteoporosis darkens the marrow)
    packing: float  # how tightly the carpus packs: scales OVERLAP_MM
    tissue: float  # soft-tissue thickness factor (slender to stout hands): scales TISSUE_PAD


@dataclass(frozen=True)
class Pose:
    """One hand's pose and placement on the detector."""

    mirrored: bool
    zoom: float  # pixels per mm at REF_SIZE
    rotation: float  # degrees, clockwise on screen
    wrist: float  # degrees, positive = ulnar deviation
    bent: bool  # drawn as a bent wrist (BENT_TRAIN / BENT_TEST), not just a slight tilt
    spread: float
    thumb: float
    joints: tuple[np.ndarray, ...]  # per digit, per bone: extra turn (degrees; 0 for metacarpals)
    top: float  # fraction of the image above the hand
    centre: float  # horizontal position of the wrist, fraction of the width


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A patient: body scale, per-bone lengths and widths, carpal shapes, habits."""
    scale = rng.uniform(0.92, 1.08)
    roots = _DIGIT_ROOTS.copy()
    roots[:, :2] = roots[:, :2] * scale + rng.normal(0, 0.4, (5, 2))
    roots[:, 2] += rng.normal(0, 1.0, 5)
    bones = []
    for digit in _DIGIT_BONES:
        b = np.array(digit, float) * scale
        b[:, 0] *= rng.normal(1, 0.035, len(b))
        b[:, 1:] *= rng.normal(1, 0.04, (len(b), 1))
        bones.append(b)
    carpals = _CARPALS.copy()
    carpals[:, :4] *= scale
    carpals[:, :2] += rng.normal(0, 0.4, (8, 2))
    carpals[:, 2:4] *= rng.normal(1, 0.04, (8, 2))
    carpals[:, 4] += rng.normal(0, 5, 8)
    shapes = np.column_stack([rng.uniform(2.0, 2.8, 8), rng.normal(0, 0.035, (8, 6))])
    forearm = _FOREARM.copy()
    forearm[:, :5] *= scale * rng.normal(1, 0.03, (2, 1))
    return Anatomy(
        digit_roots=roots,
        digit_bones=tuple(bones),
        carpals=carpals,
        carpal_shapes=shapes,
        forearm=forearm,
        zoom=REF_SIZE * rng.uniform(0.0033, 0.0037),
        spread=rng.uniform(0.5, 1.3),
        thumb=rng.normal(0, 4),
        density=rng.uniform(0.75, 1.1),
        packing=rng.uniform(0.6, 1.4),
        tissue=rng.uniform(0.75, 1.5),
    )


def sample_pose(
    rng: np.random.Generator,
    anatomy: Anatomy,
    mirrored: bool,
    bent_often: bool,
    force_bent: bool | None = None,
) -> Pose:
    """One hand's pose; test hands are bent at the wrist more often and more strongly.

    ``force_bent``: True bends the wrist by ``BENT_CONCENTRATED``, False holds it straight
    (None: by chance, as above; the same draws, so default phantoms do not change).
    """
    chance, low, high = BENT_TEST if bent_often else BENT_TRAIN
    bent = bool(rng.random() < chance)
    if force_bent is not None:
        bent = force_bent
        _, low, high = BENT_CONCENTRATED
    if bent:
        # ulnar deviation (positive) is commoner and goes further than radial deviation
        wrist = rng.uniform(low, high) * (1 if rng.random() < 0.65 else -0.7)
    else:
        wrist = rng.normal(0, 3)
    return Pose(
        mirrored=mirrored,
        zoom=anatomy.zoom * rng.normal(1, 0.015),
        rotation=float(np.clip(rng.normal(0, 6), -15, 15)),
        wrist=wrist,
        bent=bent,
        spread=max(0.4, anatomy.spread + rng.normal(0, 0.15)),
        thumb=anatomy.thumb + rng.normal(0, 3),
        joints=tuple(np.r_[0.0, rng.normal(0, 1.5, len(b) - 1)] for b in anatomy.digit_bones),
        top=rng.uniform(0.02, 0.08),
        centre=rng.uniform(0.4, 0.6),
    )
