"""Which patients and images a phantom holds, from the seed: IDs, splits and image stems,
and each patient's anatomy, acquisition, poses and artefacts (drawn without rendering)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from bonecomp.data.phantom.anatomy import Anatomy, Pose, sample_anatomy, sample_pose
from bonecomp.data.phantom.artefacts import Artefacts, sample_artefacts
from bonecomp.data.phantom.render import APPEARANCES, Acquisition, Appearance, sample_acquisition

SPLITS: tuple[str, ...] = ("train", "test")

_FIRST_STAMP = 1_661_000_000_000  # stems look like millisecond timestamps from August 2022
_PLAN_STREAM = 7  # SeedSequence key of the data-set plan (stems, suffixes), apart from patients
_BENT_STREAM = 11  # SeedSequence key of the patients ``concentrate_bends`` bends


@dataclass(frozen=True)
class PatientJob:
    """One patient to generate: its split, index in the split, ID folder and two stems."""

    split: str
    index: int
    patient_id: str
    stems: tuple[str, str]  # right hand, left hand
    bent: bool | None = None  # both wrists bent (True) or straight (False); None: by chance


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


def concentrate_bends(jobs: list[PatientJob], seed: int, bent_patients: int) -> list[PatientJob]:
    """``jobs`` with ``bent_patients`` training patients (drawn from the seed) bent at both
    wrists and every other training patient straight: bent hands in a few patients only,
    as a test of stratified folds needs. Test patients keep their chance."""
    train = [j for j in jobs if j.split == "train"]
    if not 0 <= bent_patients <= len(train):
        raise ValueError(f"bent_patients must be in 0..{len(train)}, got {bent_patients}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _BENT_STREAM]))
    chosen = set(rng.permutation(len(train))[:bent_patients].tolist())
    return [
        dataclasses.replace(j, bent=j.index in chosen) if j.split == "train" else j for j in jobs
    ]


@dataclass(frozen=True)
class Hand:
    """One image of a patient, drawn but not rendered; ``rng`` goes on to render it."""

    stem: str
    pose: Pose
    artefacts: Artefacts
    rng: np.random.Generator


@dataclass(frozen=True)
class Patient:
    """A patient's shared draws and its two hands (right, then the mirrored left)."""

    anatomy: Anatomy
    look: Acquisition
    hands: tuple[Hand, Hand]
    meta_rng: np.random.Generator  # JSON quirks (annotation order, ids)


def sample_patient(
    job: PatientJob, seed: int, appearance: Appearance = APPEARANCES["default"]
) -> Patient:
    """Everything random about one patient, from its own seed streams (so files do not
    depend on the worker count); poses and artefacts are cheap, so shares of bent wrists or
    artefacts can be counted without rendering a pixel. ``appearance`` changes only how
    the images look (``render.Appearance``), never the hands."""
    streams = np.random.SeedSequence([seed, SPLITS.index(job.split), job.index]).spawn(7)
    anatomy = sample_anatomy(np.random.default_rng(streams[0]))
    look = sample_acquisition(np.random.default_rng(streams[6]), appearance)
    hands = []
    for mirrored, stream, extra, stem in zip(
        (False, True), streams[1:3], streams[4:6], job.stems, strict=True
    ):
        rng = np.random.default_rng(stream)
        pose = sample_pose(rng, anatomy, mirrored, job.split == "test", job.bent)
        artefacts = sample_artefacts(np.random.default_rng(extra))
        hands.append(Hand(stem, pose, artefacts, rng))
    return Patient(anatomy, look, (hands[0], hands[1]), np.random.default_rng(streams[3]))
