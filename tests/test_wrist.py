"""The wrist angle measured from polygons matches the bend the phantom drew, and the
phantom can concentrate bent wrists in a few patients without changing its default output."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonecomp.data.annotations import load_annotation
from bonecomp.data.phantom import make_phantom, plan_patients, sample_patient
from bonecomp.data.phantom.hand import draw_hand
from bonecomp.data.wrist import ANGLE_CLASSES, wrist_angle, wrist_angle_of_masks

BENDS = (-15.0, 0.0, 12.0, 25.0)  # degrees, positive = towards the ulna (the generator's sign)


def _hands(n_patients: int = 2, seed: int = 3):
    """(anatomy, pose, look) of both hands (right, mirrored left) of a few phantom patients."""
    for job in plan_patients(seed, n_patients, 0):
        patient = sample_patient(job, seed)
        for hand in patient.hands:
            yield patient.anatomy, hand.pose, patient.look


def _polygons(anatomy, pose, look, bend: float, size: int = 256) -> list[np.ndarray]:
    """The phantom's polygons of one hand re-posed with the wrist bent by ``bend``."""
    _, polygons = draw_hand(
        anatomy, dataclasses.replace(pose, wrist=bend), size, np.random.default_rng(0), look
    )
    return polygons


def test_measured_angle_follows_the_bend_the_generator_applied():
    for anatomy, pose, look in _hands():
        measured = [wrist_angle(_polygons(anatomy, pose, look, b)) for b in BENDS]
        # The phantom's forearm leans a few degrees against its metacarpals (its reference
        # skeleton), so the absolute angle is within 5 degrees of the bend; how it changes
        # with the bend follows the bend closely, on right and mirrored left hands alike.
        assert np.abs(np.subtract(measured, BENDS)).max() < 5.0, (pose.mirrored, measured)
        steps = np.diff(measured) - np.diff(BENDS)
        assert np.abs(steps).max() < 1.5, (pose.mirrored, measured)


def test_angle_from_masks_equals_angle_from_polygons():
    anatomy, pose, look = next(_hands(1))
    size = 256
    polygons = _polygons(anatomy, pose, look, 18.0, size)
    masks = {}
    for c in ANGLE_CLASSES:
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [polygons[c].reshape(-1, 1, 2)], 1)
        masks[c] = mask
    assert wrist_angle_of_masks(masks) == pytest.approx(wrist_angle(polygons), abs=1.5)
    masks[ANGLE_CLASSES[-1]][:] = 0  # a bone not predicted: no angle
    assert np.isnan(wrist_angle_of_masks(masks))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_bent_patients_concentrates_bends_and_leaves_the_default_alone(tmp_path):
    kw = dict(train_patients=6, test_patients=1, size=128, seed=2, workers=1, progress=False)
    plain = make_phantom(tmp_path / "default", **kw)
    again = make_phantom(tmp_path / "none", bent_patients=None, **kw)
    assert _digest(plain.root) == _digest(again.root)  # the option off: the same bytes
    bent = make_phantom(tmp_path / "bent", bent_patients=2, **kw)
    jobs = plan_patients(2, 6, 1)
    test_stems = {s for j in jobs if j.split == "test" for s in j.stems}
    by_patient = {}
    for j in jobs:
        if j.split == "train":
            angles = []
            for stem in j.stems:
                doc = bent.root / "train" / "outputs_json" / j.patient_id / f"{stem}.json"
                angles.append(wrist_angle(load_annotation(doc)))
            by_patient[j.patient_id] = angles
    bent_ids = [p for p, a in by_patient.items() if min(abs(x) for x in a) >= 10]
    straight_ids = [p for p, a in by_patient.items() if max(abs(x) for x in a) < 10]
    assert len(bent_ids) == 2 and len(straight_ids) == 4, by_patient
    assert bent.stats.bent["train"] == 4  # both hands of two patients
    # the test split is drawn as without the option
    for stem in test_stems:
        a = next((plain.root / "test" / "DCM").rglob(f"{stem}.png")).read_bytes()
        assert a == next((bent.root / "test" / "DCM").rglob(f"{stem}.png")).read_bytes()


def test_bent_patients_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"bent_patients must be in 0\.\.3"):
        make_phantom(tmp_path, 3, 0, size=128, workers=1, progress=False, bent_patients=4)
    assert not (tmp_path / "train").exists()  # refused before writing
