"""Write a phantom to disk in the competition layout: PNGs and annotation JSONs, in parallel.

Each patient is drawn from its own seed streams, so the files do not depend on the number
of worker processes. Workers are started with ``spawn``: a script calling ``make_phantom``
with more than one worker needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from bonecomp.classes import CLASSES, NUM_CLASSES
from bonecomp.data.phantom.hand import draw_hand
from bonecomp.data.phantom.plan import (
    SPLITS,
    PatientJob,
    concentrate_bends,
    plan_patients,
    sample_patient,
)
from bonecomp.data.phantom.render import Appearance, get_appearance
from bonecomp.data.phantom.stats import ImageStats, PhantomStats, label_overlap
from bonecomp.fileio import atomic_write
from bonecomp.workers import end_with_parent, spawn_context

MIN_SIZE = 128  # below this the distal phalanges shrink to a pixel or two
FAKE_SIDE = 3060  # the wrong height/width the real JSON metadata carries


@dataclass(frozen=True)
class PhantomSummary:
    """What ``make_phantom`` wrote."""

    root: Path
    n_train_images: int
    n_test_images: int
    size: int
    seed: int
    stats: PhantomStats  # overlap rate, bent wrists and artefacts, as measured while drawing
    appearance: str = "default"


def make_phantom(
    out: Path | str,
    train_patients: int = 10,
    test_patients: int = 4,
    size: int = 2048,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    bent_patients: int | None = None,
    appearance: str = "default",
) -> PhantomSummary:
    """Write a synthetic data set in the competition layout under ``out``.

    The output depends only on (seed, patient counts, size, bent_patients, appearance):
    byte-identical whatever the number of worker processes. ``appearance`` (``default``,
    ``film``: ``render.APPEARANCES``) changes the pixels only: the same seed gives the
    same hands, poses and JSONs in every appearance. Refuses to write where a previous phantom
    (``train/``, ``test/`` or ``test_labels/``) exists unless ``overwrite``, which removes
    those folders only. ``bent_patients``: that many training patients bend both wrists
    and the others none (``plan.concentrate_bends``); None: each hand by chance.
    """
    if train_patients < 0 or test_patients < 0 or train_patients + test_patients == 0:
        raise ValueError("need a non-negative number of train and test patients, not both 0")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    look = get_appearance(appearance)
    jobs = plan_patients(seed, train_patients, test_patients)
    if bent_patients is not None:
        jobs = concentrate_bends(jobs, seed, bent_patients)
    root = Path(out)
    _prepare_root(root, overwrite)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(jobs), desc="phantom", unit="patient", disable=not progress)
    images: list[ImageStats] = []
    with bar:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                images += _write_patient(job, root, size, seed, look)
                bar.update()
        else:
            ctx = spawn_context()  # spawn: safe beside threads (torch, cv2); ends with us
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
            ) as pool:
                futures = [pool.submit(_write_patient, job, root, size, seed, look) for job in jobs]
                for future in as_completed(futures):
                    images += future.result()
                    bar.update()
    stats = PhantomStats.collect(images)
    return PhantomSummary(
        root, 2 * train_patients, 2 * test_patients, size, seed, stats, appearance
    )


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


def _init_worker(parent: int) -> None:
    """End with ``parent`` (``bonecomp.workers``); one OpenCV thread per worker process:
    the pool already uses the cores."""
    end_with_parent(parent)
    cv2.setNumThreads(1)


def _write_patient(
    job: PatientJob, root: Path, size: int, seed: int, look: Appearance
) -> list[ImageStats]:
    """Draw and write both hands of one patient (PNGs and JSONs), each file atomically;
    return what each image holds (bent wrist, artefacts, overlapping labels)."""
    patient = sample_patient(job, seed, look)
    image_dir = root / job.split / "DCM" / job.patient_id
    label_dir = root / ("train/outputs_json" if job.split == "train" else "test_labels")
    label_dir = label_dir / job.patient_id
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    stats = []
    for hand in patient.hands:
        image, polygons = draw_hand(
            patient.anatomy, hand.pose, size, hand.rng, patient.look, hand.artefacts
        )
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise RuntimeError(f"cannot encode {hand.stem}.png")
        doc = _annotation_doc(polygons, job, hand.stem, patient.meta_rng)
        _write_atomic(image_dir / f"{hand.stem}.png", png.tobytes())
        _write_atomic(label_dir / f"{hand.stem}.json", _dump_json(doc))
        multi, bone = label_overlap(polygons, size)
        stats.append(
            ImageStats(job.split, hand.pose.bent, tuple(hand.artefacts.kinds()), multi, bone, size)
        )
    return stats


def _write_atomic(path: Path, data: bytes) -> None:
    """A crash never leaves a truncated final file (see ``bonecomp.fileio``)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def _dump_json(doc: dict) -> bytes:
    return json.dumps(doc).encode("utf-8")


def _annotation_doc(
    polygons: Sequence[np.ndarray], job: PatientJob, stem: str, rng: np.random.Generator
) -> dict:
    """The annotation JSON of one image, with the real data's quirks (docs/format.md)."""
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
