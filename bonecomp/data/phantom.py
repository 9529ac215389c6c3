"""Synthetic hand X-ray phantom: a byte-exact stand-in for the private competition data.

Writes the FORMAT.md layout (``train/DCM``, ``train/outputs_json``, ``test/DCM``) plus
``test_labels/`` (annotations of the test images, for local scoring only). Every patient has
two hands: a right hand and its mirror image as the left hand, in a slightly different pose.

The skeleton is parametric, in millimetres, for a right hand seen palm down (PA view):
``x`` points towards the little finger, ``y`` towards the fingertips. Long bones are shafts
with flared, rounded ends; carpals are perturbed super-ellipses. Bones are pulled back along
rays from their own centre (line) so that neighbours keep a small joint gap and every outline
stays simple; Trapezium/Trapezoid and Triquetrum/Pisiform are not separated, so they overlap
as in the real data. Images show the right hand with its thumb on the left. The ground-truth
polygons are exactly the integer polygons the bones are filled with, so labels match pixels.

Worker processes are started with ``spawn``: a script calling ``make_phantom`` with more than
one worker needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from bonecomp.classes import CARPALS, CLASSES, FINGERS, FOREARM, NUM_CLASSES, THUMB

SPLITS: tuple[str, ...] = ("train", "test")
MIN_SIZE = 128  # below this the distal phalanges shrink to a pixel or two
FAKE_SIDE = 3060  # the wrong height/width the real JSON metadata carries

_REF_SIZE = 2048  # sizes and point spacings are defined at the competition resolution
_FIRST_STAMP = 1_661_000_000_000  # stems look like millisecond timestamps from August 2022
_PLAN_STREAM = 7  # SeedSequence key of the data-set plan (stems, suffixes), apart from patients

# --- Canonical anatomy (mm, right hand, x towards the little finger, y towards the fingertips)

# Digits in the order thumb, index, middle, ring, little; bones from the metacarpal outwards.
_DIGIT_CLASSES: tuple[tuple[int, ...], ...] = tuple(tuple(reversed(d)) for d in (THUMB, *FINGERS))
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
_CAPS = {
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
        [9.5, -16.0, 16.0, 14.0, 11.0, -10.0],
    ]
)
_FOREARM_LENGTH = 320.0  # long enough to leave the image at the bottom
_FOREARM_CAPS = (((0.3, 4.0), (0.25, 3.0)), ((0.3, 4.0), (0.6, 2.0)))
_PIVOT = np.array([0.0, -2.0])  # centre of the capitate head: the wrist bends about it
_OVERLAPS = frozenset(
    {frozenset((CARPALS[0], CARPALS[1])), frozenset((CARPALS[6], CARPALS[7]))}
)  # Trapezium/Trapezoid, Triquetrum/Pisiform
_JOINT_GAP = 1.8  # mm between consecutive bones of a digit
_CARVE_GAP = 1.5  # mm kept between bones that are carved apart
_CORTEX_MM = tuple(1.0 if c in CARPALS else 1.8 for c in range(NUM_CLASSES))
_TISSUE_PAD = {"finger": 4.5, "palm": 7.0, "forearm": 9.0}  # soft tissue around bones (mm)


@dataclass(frozen=True)
class PhantomSummary:
    """What ``make_phantom`` wrote."""

    root: Path
    n_train_images: int
    n_test_images: int
    size: int
    seed: int


@dataclass(frozen=True)
class PatientJob:
    """One patient to generate: its split, index in the split, ID folder and two stems."""

    split: str
    index: int
    patient_id: str
    stems: tuple[str, str]  # right hand, left hand


@dataclass(frozen=True)
class _Segment:
    """A long bone: base point and unit direction (towards its head), length and widths."""

    base: np.ndarray
    direction: np.ndarray
    length: float
    widths: tuple[float, float, float]  # base, shaft, head
    caps: tuple[tuple[float, float], tuple[float, float]]
    tilt: float = 0.0  # degrees; tilts the head's end line (radial styloid)


@dataclass(frozen=True)
class _Anatomy:
    """One patient's skeleton and habits, shared by both hands."""

    digit_roots: np.ndarray  # like _DIGIT_ROOTS, jittered
    digit_bones: tuple[np.ndarray, ...]  # per digit (n_bones, 4), scaled
    carpals: np.ndarray  # like _CARPALS, jittered
    carpal_shapes: np.ndarray  # (8, 7): super-ellipse exponent, Fourier terms 2..4
    forearm: np.ndarray  # like _FOREARM, scaled
    zoom: float  # pixels per mm at _REF_SIZE
    spread: float  # habitual finger spread
    thumb: float  # habitual thumb abduction offset (degrees)
    density: float  # bone density factor (osteoporosis darkens the marrow)


@dataclass(frozen=True)
class _Pose:
    """One hand's pose and placement on the detector."""

    mirrored: bool
    zoom: float  # pixels per mm at _REF_SIZE
    rotation: float  # degrees, clockwise on screen
    wrist: float  # degrees, positive = ulnar deviation
    spread: float
    thumb: float
    joints: tuple[np.ndarray, ...]  # per digit, per bone: extra turn (degrees; 0 for metacarpals)
    top: float  # fraction of the image above the hand
    centre: float  # horizontal position of the wrist, fraction of the width


def make_phantom(
    out: Path | str,
    train_patients: int = 10,
    test_patients: int = 4,
    size: int = 2048,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PhantomSummary:
    """Write a synthetic data set in the competition layout under ``out``.

    The output depends only on (seed, patient counts, size): byte-identical whatever the
    number of worker processes. Refuses to write where a previous phantom (``train/``,
    ``test/`` or ``test_labels/``) exists unless ``overwrite``, which removes those folders only.
    """
    if train_patients < 0 or test_patients < 0 or train_patients + test_patients == 0:
        raise ValueError("need a non-negative number of train and test patients, not both 0")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(out)
    _prepare_root(root, overwrite)
    jobs = plan_patients(seed, train_patients, test_patients)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(jobs), desc="phantom", unit="patient", disable=not progress)
    with bar:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                _write_patient(job, root, size, seed)
                bar.update()
        else:
            ctx = get_context("spawn")  # safe even when the caller holds threads (torch, cv2)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
                futures = [pool.submit(_write_patient, job, root, size, seed) for job in jobs]
                for future in as_completed(futures):
                    future.result()
                    bar.update()
    return PhantomSummary(root, 2 * train_patients, 2 * test_patients, size, seed)


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse to mix with an existing phantom, or remove only the folders the phantom writes."""
    existing = [root / d for d in (*SPLITS, "test_labels") if (root / d).exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise ValueError(
            f"{root} already contains {names}; pass overwrite=True (--overwrite) to replace them"
        )
    for path in existing:
        shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)


def _init_worker() -> None:
    """One OpenCV thread per worker process: the pool already uses the cores."""
    cv2.setNumThreads(1)


def plan_patients(seed: int, train_patients: int, test_patients: int) -> list[PatientJob]:
    """Patient IDs and image stems for the whole data set, deterministic for the seed.

    Stems are increasing 13-digit pseudo-timestamps, so they are unique; about half the
    training patients (never test ones) carry ``_R``/``_L`` suffixes, as in the real data.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PLAN_STREAM]))
    width = max(3, len(str(train_patients + test_patients)))
    suffixed = set(rng.permutation(train_patients)[: (train_patients + 1) // 2].tolist())
    clock = _FIRST_STAMP + int(rng.integers(0, 10**9))
    jobs = []
    for split, count in zip(SPLITS, (train_patients, test_patients), strict=True):
        for index in range(count):
            first = clock + int(rng.integers(60_000, 86_400_000))  # next patient
            clock = first + int(rng.integers(5_000, 120_000))  # the other hand
            stamps = (first, clock) if rng.random() < 0.5 else (clock, first)
            tags = ("_R", "_L") if split == "train" and index in suffixed else ("", "")
            stems = (f"image{stamps[0]}{tags[0]}", f"image{stamps[1]}{tags[1]}")
            number = len(jobs) + 1
            jobs.append(PatientJob(split, index, f"ID{number:0{width}d}", stems))
    return jobs


def _write_patient(job: PatientJob, root: Path, size: int, seed: int) -> None:
    """Draw and write both hands of one patient (PNGs and JSONs), each file atomically."""
    streams = np.random.SeedSequence([seed, SPLITS.index(job.split), job.index]).spawn(4)
    anatomy = _sample_anatomy(np.random.default_rng(streams[0]))
    meta_rng = np.random.default_rng(streams[3])
    image_dir = root / job.split / "DCM" / job.patient_id
    label_dir = root / ("train/outputs_json" if job.split == "train" else "test_labels")
    label_dir = label_dir / job.patient_id
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for mirrored, stream, stem in zip((False, True), streams[1:3], job.stems, strict=True):
        rng = np.random.default_rng(stream)
        pose = _sample_pose(rng, anatomy, mirrored, bent_often=job.split == "test")
        image, polygons = _draw_hand(anatomy, pose, size, rng)
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise RuntimeError(f"cannot encode {stem}.png")
        doc = _annotation_doc(polygons, job, stem, meta_rng)
        _write_atomic(image_dir / f"{stem}.png", png.tobytes())
        _write_atomic(label_dir / f"{stem}.json", _dump_json(doc))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a side file and rename, so a crash never leaves a truncated final file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _dump_json(doc: dict) -> bytes:
    return json.dumps(doc).encode("utf-8")


def _annotation_doc(
    polygons: Sequence[np.ndarray], job: PatientJob, stem: str, rng: np.random.Generator
) -> dict:
    """The annotation JSON of one image, with the real data's quirks (FORMAT.md)."""
    order = rng.permutation(NUM_CLASSES)
    annotator = f"{int(rng.integers(16**8)):08x}"
    annotations = [
        {
            "id": _fake_uuid(rng),
            "type": "poly_seg",
            "attributes": {},
            "points": polygons[c].tolist(),
            "label": CLASSES[c],
        }
        for c in order
    ]
    return {
        "annotations": annotations,
        "attributes": {},
        "file_id": _fake_uuid(rng),
        "filename": f"{stem}.jpg",
        "parent_path": f"/{job.patient_id}",
        "last_modifier_id": annotator,
        "metadata": {"height": FAKE_SIDE, "width": FAKE_SIDE},
        "last_workers": {annotator: "annotator"} if rng.random() < 0.5 else {},
    }


def _fake_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# --- Sampling -------------------------------------------------------------------------------


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
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
    return _Anatomy(
        digit_roots=roots,
        digit_bones=tuple(bones),
        carpals=carpals,
        carpal_shapes=shapes,
        forearm=forearm,
        zoom=_REF_SIZE * rng.uniform(0.0033, 0.0037),
        spread=rng.uniform(0.5, 1.3),
        thumb=rng.normal(0, 4),
        density=rng.uniform(0.75, 1.1),
    )


def _sample_pose(
    rng: np.random.Generator, anatomy: _Anatomy, mirrored: bool, bent_often: bool
) -> _Pose:
    """One hand's pose; test hands are bent at the wrist more often and more strongly."""
    chance, low, high = (0.6, 12.0, 28.0) if bent_often else (0.25, 8.0, 18.0)
    if rng.random() < chance:
        # ulnar deviation (positive) is commoner and goes further than radial deviation
        wrist = rng.uniform(low, high) * (1 if rng.random() < 0.65 else -0.7)
    else:
        wrist = rng.normal(0, 3)
    return _Pose(
        mirrored=mirrored,
        zoom=anatomy.zoom * rng.normal(1, 0.015),
        rotation=float(np.clip(rng.normal(0, 6), -15, 15)),
        wrist=wrist,
        spread=max(0.4, anatomy.spread + rng.normal(0, 0.15)),
        thumb=anatomy.thumb + rng.normal(0, 3),
        joints=tuple(np.r_[0.0, rng.normal(0, 1.5, len(b) - 1)] for b in anatomy.digit_bones),
        top=rng.uniform(0.02, 0.08),
        centre=rng.uniform(0.4, 0.6),
    )


# --- Geometry (millimetres) -----------------------------------------------------------------


def _unit(degrees: float) -> np.ndarray:
    """Unit vector at ``degrees`` from +y, positive towards +x (the little finger)."""
    a = np.radians(degrees)
    return np.array([np.sin(a), np.cos(a)])


def _turn(points: np.ndarray, degrees: float, pivot: np.ndarray = _PIVOT) -> np.ndarray:
    """Rotate points clockwise (towards the little finger) by ``degrees`` about ``pivot``."""
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return (points - pivot) @ rot.T + pivot


def _build_skeleton(anatomy: _Anatomy, pose: _Pose) -> tuple[list[np.ndarray], dict]:
    """The 29 posed bone outlines (class order, mm) and the soft-tissue geometry around them.

    Long bones are built first, each carved clear of those before it. Carpals are then split
    from each other along straight joint lines (no bone is favoured) and carved clear of the
    long bones.
    """
    segments = _forearm_segments(anatomy) | _digit_segments(anatomy, pose)
    metacarpals = [d[0] for d in _DIGIT_CLASSES]
    phalanges = [c for d in _DIGIT_CLASSES for c in d[1:]]
    outlines: dict[int, np.ndarray] = {}
    for c in [*FOREARM, *metacarpals[2:], *metacarpals[:2], *phalanges]:
        points, origins = _long_bone(segments[c])
        limit = _ray_limit(origins, points, list(outlines.values()))
        outlines[c] = _carve(points, origins, limit)
    long_bones = list(outlines.values())
    blobs = {
        c: _carpal(anatomy.carpals[k], anatomy.carpal_shapes[k], pose.wrist)
        for k, c in enumerate(CARPALS)
    }
    for c, (points, centre) in blobs.items():
        neighbours = [
            blob for b, blob in blobs.items() if b != c and frozenset((b, c)) not in _OVERLAPS
        ]
        limit = np.minimum(
            _ray_limit(centre, points, long_bones), _split_limit(points, centre, neighbours)
        )
        outlines[c] = _carve(points, centre, limit)
    hand = [c for c in range(NUM_CLASSES) if c not in FOREARM]
    thumb_base = segments[metacarpals[0]]
    tissue = {
        "palm": np.concatenate(
            [*(outlines[c] for c in (*CARPALS, *metacarpals[1:])), _thenar(thumb_base)]
        ),
        "forearm": np.concatenate([outlines[c] for c in FOREARM]),
        "strokes": _tissue_strokes(segments),
        "hand": np.concatenate([outlines[c] for c in hand]),
    }
    return [outlines[c] for c in range(NUM_CLASSES)], tissue


def _forearm_segments(anatomy: _Anatomy) -> dict[int, _Segment]:
    """Radius and ulna, from below the image up to their distal ends; they do not bend."""
    segments = {}
    for c, row, caps in zip(FOREARM, anatomy.forearm, _FOREARM_CAPS, strict=True):
        top_x, top_y, bottom_x, head_w, shaft_w, tilt = row
        top = np.array([top_x, top_y])
        base = np.array([bottom_x, top_y - _FOREARM_LENGTH])
        direction = (top - base) / np.linalg.norm(top - base)
        widths = (shaft_w, shaft_w, head_w)
        segments[c] = _Segment(base, direction, _FOREARM_LENGTH, widths, caps, tilt)
    return segments


def _digit_segments(anatomy: _Anatomy, pose: _Pose) -> dict[int, _Segment]:
    """Chain each digit's bones from its metacarpal base, turning at the joints."""
    angles = _digit_angles(anatomy, pose)
    segments = {}
    for d, classes in enumerate(_DIGIT_CLASSES):
        point = _turn(anatomy.digit_roots[d, :2], pose.wrist)
        for k, c in enumerate(classes):
            length, *widths = anatomy.digit_bones[d][k]
            direction = _unit(angles[d][k])
            kind = "metacarpal" if k == 0 else "distal" if k == len(classes) - 1 else "phalanx"
            segments[c] = _Segment(point, direction, length, tuple(widths), _CAPS[kind])
            point = point + (length + _JOINT_GAP) * direction
    return segments


def _digit_angles(anatomy: _Anatomy, pose: _Pose) -> list[np.ndarray]:
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


def _long_bone(seg: _Segment, n: int = 96) -> tuple[np.ndarray, np.ndarray]:
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
    turn = wrist if distal_row else wrist / 2
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    p = shape[0]
    radius = (
        np.abs(np.cos(theta) / (long_axis / 2)) ** p + np.abs(np.sin(theta) / (short_axis / 2)) ** p
    ) ** (-1 / p)
    k = np.arange(2, 5)[:, None]
    bumps = shape[1:4, None] * np.cos(k * theta) + shape[4:7, None] * np.sin(k * theta)
    radius *= 1 + bumps.sum(0)
    phi = theta + np.radians(angle - turn)
    centre = _turn(np.array([cx, cy]), turn)
    points = centre + radius[:, None] * np.column_stack([np.cos(phi), np.sin(phi)])
    return points, centre


def _ray_limit(
    origins: np.ndarray, points: np.ndarray, obstacles: list[np.ndarray], gap: float = _CARVE_GAP
) -> np.ndarray:
    """How far each point may reach from its origin and stay ``gap`` short of every obstacle.

    The ray from the origin through the point is cut where it first enters an obstacle.
    """
    origins = np.broadcast_to(origins, points.shape)
    rays = _unit_rows(points - origins)
    lo, hi = points.min(0) - gap, points.max(0) + gap
    hit = np.full(len(points), np.inf)
    for obstacle in obstacles:
        if np.all(obstacle.max(0) >= lo) and np.all(obstacle.min(0) <= hi):
            hit = np.minimum(hit, _ray_hits(origins, rays, obstacle))
    return hit - gap


def _split_limit(
    points: np.ndarray,
    centre: np.ndarray,
    neighbours: list[tuple[np.ndarray, np.ndarray]],
    gap: float = _CARVE_GAP,
) -> np.ndarray:
    """How far each point may reach from ``centre`` and stay on this bone's side of the joint
    line with every neighbour.

    The joint line is perpendicular to the line between the two centres and divides it in
    proportion to the two bones' extents towards each other, so overlapping blobs give up
    room evenly; each bone keeps half the gap from it.
    """
    rays = _unit_rows(points - centre)
    limit = np.full(len(points), np.inf)
    for other, other_centre in neighbours:
        axis = other_centre - centre
        distance = np.linalg.norm(axis)
        axis = axis / distance
        mine = np.max((points - centre) @ axis)
        theirs = np.max((other - other_centre) @ -axis)
        line = distance * mine / (mine + theirs) - gap / 2
        facing = rays @ axis
        with np.errstate(divide="ignore"):
            limit = np.minimum(limit, np.where(facing > 0, line / facing, np.inf))
    return limit


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _carve(points: np.ndarray, origins: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Pull outline points back along their rays from ``origins`` to at most ``limit``.

    The cut depth is smoothed along the outline (never made shallower), so new facets meet
    the old outline with rounded shoulders.
    """
    rays = points - origins
    reach = np.linalg.norm(rays, axis=1)
    depth = np.maximum(reach - limit, 0)
    if not depth.any():
        return points
    smooth = np.convolve(np.concatenate([depth[-4:], depth, depth[:4]]), np.ones(9) / 9, "valid")
    depth = np.minimum(np.maximum(depth, smooth), 0.9 * reach)
    return origins + rays * ((reach - depth) / reach)[:, None]


def _ray_hits(origins: np.ndarray, rays: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance along each ray to its first crossing of the polygon's edges (inf if none)."""
    a = polygon[None]
    edge = np.roll(polygon, -1, axis=0)[None] - a
    w = a - origins[:, None]
    u = rays[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = u[..., 0] * edge[..., 1] - u[..., 1] * edge[..., 0]
        t = (w[..., 0] * edge[..., 1] - w[..., 1] * edge[..., 0]) / denom
        s = (w[..., 0] * u[..., 1] - w[..., 1] * u[..., 0]) / denom
    valid = (t > 0) & (s >= 0) & (s <= 1)
    return np.where(valid, t, np.inf).min(axis=1)


def _tissue_strokes(segments: dict[int, _Segment]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Soft tissue of the digits: one thick round-capped stroke per bone (mm)."""
    strokes = []
    for classes in _DIGIT_CLASSES:
        for c in classes:
            seg = segments[c]
            end = seg.base + seg.direction * (seg.length - 1.5)
            thickness = max(seg.widths) + 2 * _TISSUE_PAD["finger"]
            strokes.append((seg.base, end, thickness))
    return strokes


def _thenar(thumb_metacarpal: _Segment) -> np.ndarray:
    """Points of the thenar web: the palm reaches halfway up the thumb metacarpal."""
    seg = thumb_metacarpal
    return seg.base + np.outer([0.0, 0.5], seg.direction) * seg.length


# --- Image space ----------------------------------------------------------------------------


def _draw_hand(
    anatomy: _Anatomy, pose: _Pose, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one hand: the uint8 image and its 29 integer polygons (class order)."""
    outlines, tissue = _build_skeleton(anatomy, pose)
    matrix, offset, px_per_mm = _placement(tissue["hand"], pose, size)

    def to_px(points: np.ndarray) -> np.ndarray:
        return points @ matrix.T + offset

    polygons = [_finalize(to_px(o), size) for o in outlines]
    tissue_px = {
        "hulls": [
            (to_px(tissue["palm"]), _TISSUE_PAD["palm"] * px_per_mm),
            (to_px(tissue["forearm"]), _TISSUE_PAD["forearm"] * px_per_mm),
        ],
        "strokes": [(to_px(a), to_px(b), t * px_per_mm) for a, b, t in tissue["strokes"]],
    }
    image = _render(polygons, tissue_px, size, px_per_mm, anatomy.density, pose.mirrored, rng)
    return image, polygons


def _placement(hand: np.ndarray, pose: _Pose, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The mm-to-pixel map: mirror, rotate, scale, then fit the hand inside the frame.

    The hand (all bones but the forearm, plus soft tissue) is shrunk if it would not fit, then
    placed ``pose.top`` below the top edge with the wrist at ``pose.centre`` of the width, as
    far as the hand stays inside the frame.
    """
    px_per_mm = pose.zoom * size / _REF_SIZE
    a = np.radians(pose.rotation)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    flip = np.diag([-1.0 if pose.mirrored else 1.0, -1.0])  # image y points down
    matrix = rot @ flip
    pad = _TISSUE_PAD["palm"]
    lo, hi = (hand @ matrix.T).min(0) - pad, (hand @ matrix.T).max(0) + pad
    extent = hi - lo
    fit = min(1.0, 0.94 * size / (extent[0] * px_per_mm), 0.9 * size / (extent[1] * px_per_mm))
    px_per_mm *= fit
    margin = 0.02 * size
    wrist_x = pose.centre * size - (_PIVOT @ matrix.T)[0] * px_per_mm
    left, right = margin - lo[0] * px_per_mm, size - margin - hi[0] * px_per_mm
    offset = np.array([np.clip(wrist_x, left, right), pose.top * size - lo[1] * px_per_mm])
    return matrix * px_per_mm, offset, px_per_mm


def _finalize(points: np.ndarray, size: int) -> np.ndarray:
    """Clip an outline (pixels) to the frame, resample it evenly, round to distinct ints."""
    clipped = _clip_to_square(points, size - 1)
    perimeter = _perimeter(clipped)
    n = int(np.clip(round(perimeter * _REF_SIZE / size / 8), 40, 240))
    poly = np.clip(np.rint(_resample(clipped, n)), 0, size - 1).astype(np.int32)
    poly = poly[np.any(poly != np.roll(poly, 1, axis=0), axis=1)]
    if len(np.unique(poly, axis=0)) < 3:
        raise RuntimeError("a bone collapsed to fewer than 3 distinct points")
    return poly


def _clip_to_square(points: np.ndarray, high: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a closed polygon to the square [0, high]^2."""
    if points.min() >= 0 and points.max() <= high:
        return points
    poly = points
    for axis, limit, sign in ((0, 0.0, 1), (0, high, -1), (1, 0.0, 1), (1, high, -1)):
        inside = sign * (poly[:, axis] - limit)  # >= 0 inside
        nxt = np.roll(poly, -1, axis=0)
        inside_next = np.roll(inside, -1)
        crossing = (inside >= 0) != (inside_next >= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(crossing, inside / (inside - inside_next), 0.0)
        cut = poly + t[:, None] * (nxt - poly)
        candidates = np.stack([poly, cut], axis=1)
        keep = np.column_stack([inside >= 0, crossing])
        poly = candidates[keep]
        if len(poly) < 3:
            raise RuntimeError("a bone lies outside the image")
    return poly


def _perimeter(poly: np.ndarray) -> float:
    return float(np.linalg.norm(np.roll(poly, -1, axis=0) - poly, axis=1).sum())


def _resample(poly: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced along a closed polygon's outline."""
    closed = np.vstack([poly, poly[:1]])
    step = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    keep = np.concatenate([[True], step > 1e-9])
    closed = closed[keep]
    along = np.concatenate([[0.0], np.cumsum(step[step > 1e-9])])
    target = np.arange(n) * along[-1] / n
    return np.column_stack([np.interp(target, along, closed[:, i]) for i in range(2)])


# --- Rendering ------------------------------------------------------------------------------


def _render(
    polygons: list[np.ndarray],
    tissue: dict,
    size: int,
    px_per_mm: float,
    density: float,
    mirrored: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Compose the X-ray: dark background, soft tissue, bones with bright cortices, uneven
    exposure, noise and a side marker."""
    grain = np.random.default_rng(rng.integers(2**63))  # noise fields, whose size varies
    low = max(64, size // 4)
    tissue_low = _tissue_mask(_scaled(tissue, low / size), low)
    soft = _tissue_thickness(tissue_low, px_per_mm * low / size)
    soft = cv2.resize(soft, (size, size), interpolation=cv2.INTER_LINEAR)
    soft *= rng.uniform(45, 70)
    soft += rng.uniform(8, 25)  # background
    texture = _trabeculae(size, px_per_mm, grain)
    image = _bone_layer(polygons, size, px_per_mm, density, texture, rng)  # float32, in place
    image += soft
    image *= _exposure(size, rng)
    image += _mottle(size, rng.uniform(2, 5), grain)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)
    _draw_marker(image, "L" if mirrored else "R", tissue_low, rng)
    return image


def _tissue_mask(tissue: dict, low: int) -> np.ndarray:
    """Binary soft-tissue silhouette (uint8 0/1) at ``low`` x ``low`` pixels.

    Palm and forearm are convex hulls widened by their padding; each phalanx is a thick
    round-capped stroke.
    """
    mask = np.zeros((low, low), np.uint8)
    for points, pad in tissue["hulls"]:
        hull = cv2.convexHull(np.rint(points).astype(np.int32))
        cv2.fillPoly(mask, [hull], 1)
        cv2.polylines(mask, [hull], True, 1, thickness=max(1, round(2 * pad)))
    for a, b, thickness in tissue["strokes"]:
        start, end = (tuple(int(v) for v in np.rint(p)) for p in (a, b))
        cv2.line(mask, start, end, 1, thickness=max(1, round(thickness)))
    return mask


def _tissue_thickness(mask: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Relative X-ray path length through the soft tissue (0..1, float32).

    Limbs are roughly cylindrical, so the path length rises steeply at the skin line and
    flattens inside; a small blur softens the skin line.
    """
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3) / (7.0 * px_per_mm)
    thickness = np.sqrt(1 - (1 - np.minimum(depth, 1)) ** 2)
    return cv2.GaussianBlur(thickness, (0, 0), max(0.5, 0.6 * px_per_mm))


def _scaled(tissue: dict, f: float) -> dict:
    """Tissue geometry (pixels) scaled by ``f``."""
    return {
        "hulls": [(p * f, pad * f) for p, pad in tissue["hulls"]],
        "strokes": [(a * f, b * f, t * f) for a, b, t in tissue["strokes"]],
    }


def _bone_layer(
    polygons: list[np.ndarray],
    size: int,
    px_per_mm: float,
    density: float,
    texture: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Sum of bone densities: each polygon filled with textured marrow and a bright cortex.

    Densities add where bones overlap, as attenuation does. The layer is blurred slightly so
    the edges look photographic; the half-intensity contour stays on the polygon.
    """
    layer = np.zeros((size, size), np.float32)
    marrow = rng.uniform(40, 60) * density
    cortex = rng.uniform(65, 95)
    for c, poly in enumerate(polygons):
        x0, y0 = np.maximum(poly.min(0) - 1, 0)
        x1, y1 = np.minimum(poly.max(0) + 2, size)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [poly], 1, offset=(-int(x0), -int(y0)))
        dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        band = 1 / (1 + (dist / max(0.7, _CORTEX_MM[c] * px_per_mm)) ** 4)
        value = marrow * rng.uniform(0.9, 1.1) * texture[y0:y1, x0:x1] + cortex * band
        layer[y0:y1, x0:x1] += value * mask
    return cv2.GaussianBlur(layer, (0, 0), max(0.3, 0.12 * px_per_mm))


def _trabeculae(size: int, px_per_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative marrow texture around 1: smoothed noise with sub-millimetre grain."""
    low = max(32, size // 4)
    noise = rng.standard_normal((low, low), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), max(0.5, 0.15 * px_per_mm * low / size))
    noise = 1 + noise * (0.15 / max(float(noise.std()), 1e-6))
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)


def _exposure(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: a random linear gradient and a vignette."""
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    gx, gy = (float(g) for g in rng.uniform(-0.12, 0.12, 2))
    vignette = rng.uniform(0.05, 0.2)
    return (1 + gx * axis - vignette * axis**2)[None, :] + (gy * axis - vignette * axis**2)[:, None]


def _mottle(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Detector noise, drawn at half resolution (quantum mottle is slightly correlated)."""
    noise = rng.standard_normal((size // 2, size // 2), dtype=np.float32)
    noise *= sigma
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)


def _draw_marker(
    image: np.ndarray, letter: str, tissue_low: np.ndarray, rng: np.random.Generator
) -> None:
    """Burn the side letter into a corner, the first in a random order that is clear of tissue."""
    size = image.shape[0]
    scale = 4.0 * size / _REF_SIZE
    thickness = max(1, round(10 * size / _REF_SIZE))
    (w, h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = round(0.03 * size)
    corners = [(x, y) for y in (margin + h, size - margin) for x in (margin, size - margin - w)]
    f = tissue_low.shape[0] / size

    def covered(corner: tuple[int, int]) -> float:
        x, y = corner
        return float(
            tissue_low[int((y - h) * f) : int(y * f) + 1, int(x * f) : int((x + w) * f) + 1].mean()
        )

    corner = min((corners[i] for i in rng.permutation(4)), key=covered)
    brightness = int(rng.integers(225, 256))
    cv2.putText(
        image, letter, corner, cv2.FONT_HERSHEY_SIMPLEX, scale, brightness, thickness, cv2.LINE_AA
    )
