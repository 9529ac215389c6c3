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

The steps are a registry, ``STEPS`` (name -> ``Step``: a function of the image and the
``Preprocess``, whose fields are the steps' parameters); ``register_preprocess`` adds one,
also from a user's module under ``extensions`` (docs/extending.md). A step with parameters
of its own in the config adds its keys to ``DataConfig`` and ``Preprocess``. The random
training augmentation (a ``CLAHE`` entry of ``data.augment``) is a separate thing (albumentations,
training only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from bonecomp.config import ConfigError, DataConfig
from bonecomp.extensions import FILE_MODULE_PREFIX
from bonecomp.registry import Registry


def _clahe(image: np.ndarray, p: Preprocess) -> np.ndarray:
    """OpenCV's CLAHE on the grey image: ``clahe_grid`` x ``clahe_grid`` tiles, histogram
    clipped at ``clahe_clip`` (OpenCV's clipLimit)."""
    grid = (p.clahe_grid, p.clahe_grid)
    return cv2.createCLAHE(clipLimit=p.clahe_clip, tileGridSize=grid).apply(image)


@dataclass(frozen=True)
class Step:
    """A registered step: ``apply(image, p)`` maps the (H, W) uint8 PNG to a uint8 image of
    the same shape (``p``: the ``Preprocess``); ``params``: the ``Preprocess`` fields it
    reads, which name it in labels (so a cache built with other values is another cache)."""

    apply: Callable[[np.ndarray, Preprocess], np.ndarray]
    params: tuple[str, ...] = ()


STEPS: Registry[Step] = Registry("preprocessing step", "data.preprocess")


def register_preprocess(
    name: str,
    apply: Callable[[np.ndarray, Preprocess], np.ndarray] | None = None,
    *,
    params: tuple[str, ...] = (),
    replace: bool = False,
):
    """Add the step ``name`` (``data.preprocess: [name]``): ``register_preprocess(name,
    apply)``, or ``@register_preprocess(name)`` over ``apply(image, p) -> image``. Returns
    ``apply``. The cache's folder and fingerprint carry the name (and ``params``' values):
    a step whose code changes under the same name needs a new name or a deleted cache. A
    name already registered is refused (``ValueError``) unless ``replace=True``."""

    def add(fn: Callable[[np.ndarray, Preprocess], np.ndarray]):
        STEPS.register(name, Step(fn, tuple(params)), replace=replace)
        return fn

    return add if apply is None else add(apply)


register_preprocess("clahe", _clahe, params=("clahe_clip", "clahe_grid"))


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
            params = STEPS.get(name).params
            parts.append("-".join([name, *(f"{getattr(self, k):g}" for k in params)]))
        return "+".join(parts)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W) uint8 with every step applied in order (the array itself when
        there are none)."""
        for name in self.steps:
            image = STEPS.get(name).apply(image, self)
        return image

    @property
    def modules(self) -> tuple[str, ...]:
        """The user modules that registered these steps, as ``extensions`` entries (a dotted
        name, or the file of one loaded from a ``.py`` file): a spawned process (the cache
        builder's pool) imports them to know the steps; bonecomp's own are left out."""
        out = []
        for name in self.steps:
            module = getattr(STEPS.get(name).apply, "__module__", "") or ""
            if module == "bonecomp" or module.startswith("bonecomp."):
                continue
            file = getattr(sys.modules.get(module), "__file__", None)
            out.append(file if module.startswith(FILE_MODULE_PREFIX) and file else module)
        return tuple(dict.fromkeys(out))

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
        STEPS.get(name, k)  # an unknown one: the registry's one line
        if name in seen:
            raise ConfigError(f"data.preprocess: {name!r} is listed twice ({k})", k)
        seen.add(name)
