"""Fixed preprocessing of every image, training and test alike (``data.preprocess``).

A step is a deterministic function of the grey uint8 PNG, applied at the source
resolution right after decoding, before any crop or resize: the training cache
(``data.cache``), the test images of inference (``data.dataset.TestImages``), the carpal
crop stage and the pseudo-label writer all call ``Preprocess`` on the same decoded PNG,
so a cache row and the inference input at the same size are the same pixels. At the
source size the operation does not depend on ``data.image_size`` or on the carpal box,
and one CLAHE per test image serves every member size of an ensemble.

Inference never takes the preprocessing from its own config: each ensemble member gets
``Preprocess.of`` its checkpoint's saved ``data`` section (``inference.ensemble``), so a
model trained with CLAHE is fed CLAHE images, and members that differ each get their own.

The steps are a registry (name -> function of the image and the step's parameters); a
new step is one entry in ``STEPS`` plus its keys in ``DataConfig``. The random training
augmentation ``data.augment.clahe_p`` is a separate thing (albumentations, training only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from bonecomp.config import ConfigError, DataConfig


def _clahe(image: np.ndarray, p: Preprocess) -> np.ndarray:
    """OpenCV's CLAHE on the grey image: ``clahe_grid`` x ``clahe_grid`` tiles, histogram
    clipped at ``clahe_clip`` (OpenCV's clipLimit)."""
    grid = (p.clahe_grid, p.clahe_grid)
    return cv2.createCLAHE(clipLimit=p.clahe_clip, tileGridSize=grid).apply(image)


# name -> (the step, the Preprocess fields it reads: they name the step in labels)
STEPS: dict[str, tuple[Callable[[np.ndarray, Preprocess], np.ndarray], tuple[str, ...]]] = {
    "clahe": (_clahe, ("clahe_clip", "clahe_grid")),
}


@dataclass(frozen=True)
class Preprocess:
    """The steps of ``data.preprocess`` with their parameters; hashable, so an ensemble
    can group its members by it. ``Preprocess()`` is no preprocessing."""

    steps: tuple[str, ...] = ()
    clahe_clip: float = 2.0
    clahe_grid: int = 8

    @classmethod
    def of(cls, data: DataConfig) -> Preprocess:
        """The preprocessing a ``data`` section asks for (a run's saved one at inference)."""
        return cls(tuple(data.preprocess), float(data.clahe_clip), int(data.clahe_grid))

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def label(self) -> str:
        """A stable name of the steps and the parameters they read (``""`` when none):
        part of the cache's folder name and fingerprint, and of the inference input keys."""
        parts = []
        for name in self.steps:
            params = STEPS[name][1]
            parts.append("-".join([name, *(f"{getattr(self, k):g}" for k in params)]))
        return "+".join(parts)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W) uint8 with every step applied in order (the array itself when
        there are none)."""
        for name in self.steps:
            image = STEPS[name][0](image, self)
        return image

    def key(self, size: int) -> int | str:
        """The inference input key of images at ``size`` with this preprocessing: the
        size itself when there is none (as before), else ``"<size>-<label>"``."""
        return size if not self.steps else f"{size}-{self.label}"


NONE = Preprocess()


def check_preprocess(data: DataConfig) -> None:
    """Every ``data.preprocess`` step is known and listed once; else one ``ConfigError``
    naming the entry and the valid steps."""
    seen: set[str] = set()
    for i, name in enumerate(data.preprocess):
        k = f"data.preprocess[{i}]"
        if name not in STEPS:
            raise ConfigError(
                f"data.preprocess: unknown step {name!r} ({k}); valid: {sorted(STEPS)}", k
            )
        if name in seen:
            raise ConfigError(f"data.preprocess: {name!r} is listed twice ({k})", k)
        seen.add(name)
