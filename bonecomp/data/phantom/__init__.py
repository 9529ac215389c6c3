"""Synthetic hand X-ray phantom: a byte-exact stand-in for the private competition data.

Writes the docs/format.md layout (``train/DCM``, ``train/outputs_json``, ``test/DCM``) plus
``test_labels/`` (annotations of the test images, for local scoring only). Every patient has
two hands: a right hand and its mirror image as the left hand, in a slightly different pose.

Modules, in dependency order: ``geometry`` (polygon maths), ``anatomy`` (reference bones,
patient and pose sampling), ``skeleton`` (posed bone outlines and soft tissue, mm),
``artefacts`` (rings, wrist objects, text: drawn, never labelled), ``render`` (pixel
polygons -> X-ray image, the patient's exposure), ``hand`` (one hand, mm -> pixels ->
image), ``plan`` (patients, IDs, stems, every random draw of a patient), ``stats`` (overlap
rate, bent wrists, artefact counts), ``write`` (files on disk, worker processes).
"""

from __future__ import annotations

from bonecomp.data.phantom.plan import SPLITS, PatientJob, plan_patients, sample_patient
from bonecomp.data.phantom.stats import PhantomStats, planned_stats
from bonecomp.data.phantom.write import FAKE_SIDE, MIN_SIZE, PhantomSummary, make_phantom

__all__ = [
    "FAKE_SIDE",
    "MIN_SIZE",
    "SPLITS",
    "PatientJob",
    "PhantomStats",
    "PhantomSummary",
    "make_phantom",
    "plan_patients",
    "planned_stats",
    "sample_patient",
]
