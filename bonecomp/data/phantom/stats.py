"""How hard a phantom is: overlapping labels, bent wrists and artefacts, counted per image.

The overlap rate is the share of *image* pixels that carry two or more labels (each polygon
filled with ``cv2.fillPoly``, as the ground truth is): the definition under which the real
data has about 0.4 % (docs/format.md). The share of bone pixels is reported beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bonecomp.data.phantom.artefacts import WRIST_KINDS
from bonecomp.data.phantom.plan import concentrate_bends, plan_patients, sample_patient
from bonecomp.data.rasterize import class_crop

ARTEFACT_KINDS = ("ring", *WRIST_KINDS, "text")


@dataclass(frozen=True)
class ImageStats:
    """What one phantom image holds."""

    split: str
    bent: bool
    artefacts: tuple[str, ...]  # kinds present (ARTEFACT_KINDS)
    multi_pixels: int  # pixels with two or more labels
    bone_pixels: int  # pixels with at least one label
    size: int


@dataclass(frozen=True)
class PhantomStats:
    """Totals over a phantom: images and bent wrists per split, artefacts, overlapping labels."""

    images: dict[str, int] = field(default_factory=dict)
    bent: dict[str, int] = field(default_factory=dict)
    artefacts: dict[str, int] = field(default_factory=dict)  # images carrying each kind
    multi_pixels: int = 0
    bone_pixels: int = 0
    image_pixels: int = 0

    @classmethod
    def collect(cls, images: Iterable[ImageStats]) -> PhantomStats:
        """Sum the images' counts (in any order: the totals do not depend on it)."""
        n, bent, kinds = Counter(), Counter(), Counter()
        multi = bone = pixels = 0
        for im in images:
            n[im.split] += 1
            bent[im.split] += im.bent
            kinds.update(im.artefacts)
            multi, bone, pixels = (
                multi + im.multi_pixels,
                bone + im.bone_pixels,
                pixels + im.size**2,
            )
        return cls(
            dict(sorted(n.items())),
            {k: bent[k] for k in sorted(n)},
            {k: kinds[k] for k in ARTEFACT_KINDS},
            multi,
            bone,
            pixels,
        )

    @property
    def overlap_rate(self) -> float:
        """Share of image pixels carrying two or more labels."""
        return self.multi_pixels / max(1, self.image_pixels)

    @property
    def overlap_of_bone(self) -> float:
        """Share of bone pixels (at least one label) carrying two or more."""
        return self.multi_pixels / max(1, self.bone_pixels)

    def bent_share(self, split: str) -> float:
        return self.bent.get(split, 0) / max(1, self.images.get(split, 0))

    def describe(self) -> str:
        """Two lines for people: overlap, bent wrists per split, artefact counts."""
        bent = ", ".join(
            f"{s} {self.bent[s]}/{self.images[s]} ({self.bent_share(s):.0%})" for s in self.images
        )
        found = ", ".join(f"{k} {v}" for k, v in self.artefacts.items())
        return (
            f"overlap: {self.overlap_rate:.2%} of image pixels carry 2+ labels "
            f"({self.overlap_of_bone:.1%} of bone pixels); bent wrists: {bent}\n"
            f"artefacts (images): {found}"
        )


def label_overlap(polygons: Sequence[np.ndarray], size: int) -> tuple[int, int]:
    """Pixels of a ``size`` x ``size`` image with two or more labels, and with at least one."""
    crops = [c for c in (class_crop(p, (size, size)) for p in polygons) if c[2].size]
    top, left = min(y for y, _, _ in crops), min(x for _, x, _ in crops)  # the bones' box
    bottom = max(y + m.shape[0] for y, _, m in crops)
    right = max(x + m.shape[1] for _, x, m in crops)
    count = np.zeros((bottom - top, right - left), np.uint8)
    for y, x, m in crops:
        count[y - top : y - top + m.shape[0], x - left : x - left + m.shape[1]] += m
    return int(np.count_nonzero(count >= 2)), int(np.count_nonzero(count))


def planned_stats(
    seed: int, train_patients: int, test_patients: int, bent_patients: int | None = None
) -> PhantomStats:
    """Bent wrists and artefacts of the phantom ``make_phantom`` would write, from the draws
    alone (milliseconds per patient, no pixels, so no overlap counts)."""
    jobs = plan_patients(seed, train_patients, test_patients)
    if bent_patients is not None:
        jobs = concentrate_bends(jobs, seed, bent_patients)
    images = [
        ImageStats(
            job.split,
            hand.pose.bent,
            tuple(hand.artefacts.kinds()),
            multi_pixels=0,
            bone_pixels=0,
            size=0,
        )
        for job in jobs
        for hand in sample_patient(job, seed).hands
    ]
    return PhantomStats.collect(images)
