"""Pseudo-label folders: test images at the training size with an ensemble's probabilities.

The format (file names in ``bonecomp.runs``, ``PseudoDir``) is written by
``PseudoWriter`` (``bonecomp.inference.pseudo_labels`` feeds it) and read by ``open_pseudo``
(training adds the images to every fold's training part). Like the training cache:

- images are the test PNGs resized with INTER_AREA to the size (the cache's way);
  probabilities are stored as uint8 (p x 255, rounded: error <= 0.002), memory-mapped;
- the folder is written under a temporary name and renamed into place whole, with
  ``meta.json`` last, so a crash never leaves a folder that opens as valid;
- opening checks every file's size, the small files' hashes and the .npy shapes; each
  row carries crc32s checked on every read, so damage stops the run naming the folder.

``PseudoDataset`` turns a row into a training item (compact uint8, like ``BoneDataset``):
the image and the target made from the probabilities by the rule (``soft``: the
probability; ``sharpen``: pixels with p >= confidence set to 1 and p <= 1 - confidence to
0, the rest kept soft), moved by the same augmentation as the real images (the maps
are warped with linear interpolation). With binary targets (``soft=False``) the target is
the ensemble's mask: p > the class's threshold from the thresholds file in use.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import PseudoRule
from bonecomp.data.augment import Augmentation, draw_geometry
from bonecomp.data.patches import PatchSampler
from bonecomp.data.sample import Item, Sample
from bonecomp.fileio import (
    file_hash,
    output_errors,
    preallocate,
    remove_stale_temps,
    replace_dir,
    temp_path,
)
from bonecomp.runs import PSEUDO_CRC, PSEUDO_IMAGES, PSEUDO_INDEX, PSEUDO_PROBS, PseudoDir

PSEUDO_VERSION = 1
PSEUDO_RULES: tuple[str, ...] = get_args(PseudoRule)
_BIG = (PSEUDO_IMAGES, PSEUDO_PROBS)  # checked by size and header on open, not hashed
INDEX_COLUMNS = ["rel", "patient", "name", "src_h", "src_w"]


class PseudoError(RuntimeError):
    """A pseudo-label folder that cannot be used; the message names it and why."""


# ------------------------------------------------------------------------------ write
class PseudoWriter:
    """Fill a pseudo-label folder row by row in a temporary folder; ``close`` moves it
    into place whole (replacing an older pseudo-label folder there), ``abort`` removes it.

    ``index`` has the columns ``INDEX_COLUMNS``, one row per image in the order of ``add``.
    """

    def __init__(self, out: Path | str, index: pd.DataFrame, size: int) -> None:
        self.out = PseudoDir(Path(out))
        if self.out.path.exists() and any(self.out.path.iterdir()) and not self.out.meta.exists():
            raise PseudoError(
                f"{self.out.path} exists and is not a pseudo-label folder; choose another --out"
            )
        self.index = index[INDEX_COLUMNS].reset_index(drop=True)
        self.size, n = size, len(index)
        self.tmp = PseudoDir(temp_path(self.out.path))
        with output_errors(self.out.path / PSEUDO_PROBS):  # the user sees their folder
            self.out.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out.path.parent)  # folders of writers that were killed
            need = n * (NUM_CLASSES + 1) * size * size + (1 << 20)
            free = shutil.disk_usage(self.out.path.parent).free
            if free < need:
                raise PseudoError(
                    f"{self.out.path}: needs {need / 1e9:.2f} GB for {n} images at {size} px, "
                    f"only {free / 1e9:.2f} GB free; free space or choose another --out"
                )
            shutil.rmtree(self.tmp.path, ignore_errors=True)
            self.tmp.path.mkdir()
            try:
                open_memmap = np.lib.format.open_memmap
                self.images = open_memmap(self.tmp.images, "w+", np.uint8, (n, size, size))
                shape = (n, NUM_CLASSES, size, size)
                self.probs = open_memmap(self.tmp.probs, "w+", np.uint8, shape)
                for path in (self.tmp.images, self.tmp.probs):  # a full disk fails here,
                    preallocate(path)  # not as a SIGBUS when a page is first written
            except BaseException:
                self.abort()
                raise
        self.crc = np.zeros((n, 2), np.uint32)
        self.done = np.zeros(n, bool)

    def add(self, row: int, image: np.ndarray, probs: np.ndarray) -> None:
        """Image (S, S) uint8 and probabilities (C, S, S) float in [0, 1] of ``row``."""
        image = np.ascontiguousarray(image, np.uint8)
        q = np.ascontiguousarray(np.rint(np.clip(probs, 0, 1) * 255), np.uint8)
        self.images[row], self.probs[row] = image, q
        self.crc[row] = zlib.crc32(image), zlib.crc32(q)
        self.done[row] = True

    def close(self, meta: dict[str, Any]) -> PseudoDir:
        """Write the small files and ``meta.json`` (``meta`` plus version, size, files);
        then rename the folder into place."""
        if not self.done.all():
            raise ValueError(f"pseudo-labels: {int((~self.done).sum())} rows never written")
        with output_errors(self.out.meta):
            self.images.flush()
            self.probs.flush()
            del self.images, self.probs
            np.save(self.tmp.crc, self.crc)
            self.index.to_csv(self.tmp.index, index=False)
            names = (PSEUDO_IMAGES, PSEUDO_PROBS, PSEUDO_CRC, PSEUDO_INDEX)
            files = {n: _describe(self.tmp.path / n, n not in _BIG) for n in names}
            full = {**meta, "version": PSEUDO_VERSION, "size": self.size, "n": len(self.index)}
            self.tmp.meta.write_text(json.dumps({**full, "files": files}, indent=1))
            replace_dir(self.tmp.path, self.out.path)
        return self.out

    def abort(self) -> None:
        for name in ("images", "probs"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self.tmp.path, ignore_errors=True)


def _describe(path: Path, hashed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"bytes": path.stat().st_size}
    if hashed:
        out["hash"] = file_hash(path)
    return out


# ------------------------------------------------------------------------------- read
@dataclass
class PseudoSet:
    """Read access to a pseudo-label folder; the big arrays are memory-mapped."""

    dir: PseudoDir
    size: int
    index: pd.DataFrame
    images: np.ndarray
    probs: np.ndarray
    crc: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def thresholds(self) -> list[float]:
        return [float(t) for t in self.meta["thresholds"]]

    def read(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (S, S) and probabilities (C, S, S), uint8 copies checked against their crc32."""
        image, probs = np.array(self.images[j]), np.array(self.probs[j])
        if (zlib.crc32(image), zlib.crc32(probs)) != tuple(int(c) for c in self.crc[j]):
            raise PseudoError(
                f"pseudo-label folder {self.dir} is damaged: row {j} "
                f"({self.index['rel'].iloc[j]}) fails its checksum; write it again"
            )
        return image, probs


def open_pseudo(folder: Path | str) -> PseudoSet:
    """Open a pseudo-label folder, or raise ``PseudoError`` saying what is wrong with it."""
    d = PseudoDir(Path(folder))
    if not d.path.is_dir():
        raise PseudoError(f"pseudo-label folder {d} does not exist")
    if not d.meta.is_file():
        raise PseudoError(
            f"{d} is not a pseudo-label folder (no {d.meta.name}): write it with "
            "scripts/pseudo_label.py"
        )
    try:
        meta = json.loads(d.meta.read_text())
        files = {n: int(v["bytes"]) for n, v in meta["files"].items()}
        size, n = int(meta["size"]), int(meta["n"])
        version, thresholds = meta["version"], meta["thresholds"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PseudoError(f"pseudo-label folder {d}: unreadable {d.meta.name}") from None
    if version != PSEUDO_VERSION:
        raise PseudoError(
            f"pseudo-label folder {d}: version {version} != {PSEUDO_VERSION}; write it again"
        )
    if len(thresholds) != NUM_CLASSES:
        raise PseudoError(
            f"pseudo-label folder {d}: {len(thresholds)} thresholds, not {NUM_CLASSES}"
        )
    for name, nbytes in files.items():
        path = d.path / name
        if not path.is_file() or path.stat().st_size != nbytes:
            raise PseudoError(f"pseudo-label folder {d} is damaged: {name} missing or truncated")
        want = meta["files"][name].get("hash")
        if want is not None and _describe(path, True)["hash"] != want:
            raise PseudoError(f"pseudo-label folder {d} is damaged: {name} fails its hash")
    shapes = {
        PSEUDO_IMAGES: (n, size, size),
        PSEUDO_PROBS: (n, NUM_CLASSES, size, size),
        PSEUDO_CRC: (n, 2),
    }
    arrays = {}
    for name, shape in shapes.items():
        try:
            arrays[name] = np.load(d.path / name, mmap_mode="r")
        except (OSError, ValueError):
            raise PseudoError(f"pseudo-label folder {d} is damaged: {name} header") from None
        if arrays[name].shape != shape:
            raise PseudoError(
                f"pseudo-label folder {d} is damaged: {name} has shape {arrays[name].shape}, "
                f"not {shape}"
            )
    index = pd.read_csv(d.index, dtype={"rel": str, "patient": str, "name": str})
    if list(index.columns) != INDEX_COLUMNS or len(index) != n:
        raise PseudoError(f"pseudo-label folder {d} is damaged: {d.index.name}")
    return PseudoSet(
        d, size, index, arrays[PSEUDO_IMAGES], arrays[PSEUDO_PROBS], arrays[PSEUDO_CRC], meta
    )


# ---------------------------------------------------------------------------- targets
def pseudo_target(
    probs: np.ndarray, rule: str, confidence: float, soft: bool, thresholds: list[float]
) -> np.ndarray:
    """(C, S, S) uint8 target from uint8 probabilities: coverage 0..255 when ``soft``
    (``rule`` soft or sharpen), else {0, 1} masks p > each class's threshold."""
    if not soft:
        # p / 255 > t on the 256 stored values, once per class, so the (C, S, S) map is
        # compared as uint8 rather than converted to float (the same masks).
        above = np.arange(256, dtype=np.float32)[None] / 255 > np.float32(thresholds)[:, None]
        first = np.where(above.any(1), above.argmax(1), 256).astype(np.uint16)
        return (probs >= first.reshape(-1, 1, 1)).astype(np.uint8)
    if rule == "soft":
        return probs
    if rule != "sharpen":
        raise ValueError(f"pseudo rule must be one of {PSEUDO_RULES}, got {rule!r}")
    out = probs.copy()  # stored p = round(255 x prob): compare on the same grid
    out[probs >= math.ceil(confidence * 255 - 1e-6)] = 255
    out[probs <= math.floor((1 - confidence) * 255 + 1e-6)] = 0
    return out


class PseudoDataset(Dataset):
    """Training items of a pseudo-label folder, compact like ``BoneDataset(compact=True)``:
    ``{"image": (S, S) uint8, "mask": (C, S, S) uint8, "index": offset + row}`` and the
    fields of ``sample`` (made by ``Sample.item``, as the real items: training passes the
    real items' contract, so a mixed batch collates).

    ``offset`` keeps the indices apart from the cache's rows (training passes the cache's
    length); ``transform`` is the real images' augmentation (see the module docstring).
    """

    def __init__(
        self,
        pseudo: PseudoSet,
        transform: Augmentation | None,
        rule: str = "soft",
        confidence: float = 0.9,
        soft: bool = True,
        offset: int = 0,
        patch: PatchSampler | None = None,
        sample: Sample | None = None,
    ) -> None:
        self.sample = sample or Sample(patch=patch is not None)
        if self.sample.patch != (patch is not None) or not self.sample.compact:
            raise ValueError(f"{self.sample!r} does not fit patch={patch} (compact items)")
        if rule not in PSEUDO_RULES:
            raise ValueError(f"pseudo rule must be one of {PSEUDO_RULES}, got {rule!r}")
        self.pseudo, self.transform, self.rule = pseudo, transform, rule
        self.confidence, self.soft, self.offset = confidence, soft, offset
        self.patch = patch

    def __len__(self) -> int:
        return len(self.pseudo)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor | int]:
        image, probs = self.pseudo.read(j)
        thr = self.pseudo.thresholds
        mask = pseudo_target(probs, self.rule, self.confidence, self.soft, thr)
        if self.patch is not None:  # no polygons: the patch is placed uniformly
            p, s = self.patch.size, image.shape[-1]
            geometry = draw_geometry(self.transform and self.transform.head, (s, s))
            rng = getattr(self.transform, "random_generator", None)
            rng = rng or np.random.default_rng(np.random.randint(2**31))  # noqa: NPY002
            y0, x0 = (int(v) for v in rng.integers(0, s - p + 1, size=2))
            image = geometry.finish(geometry.window(image, y0, x0, p))
            mask = geometry.window(mask.transpose(1, 2, 0), y0, x0, p, mask=True)
            mask = mask.reshape(p, p, -1).transpose(2, 0, 1)
        elif self.transform is not None:
            out = self.transform.head(image=image, mask=mask.transpose(1, 2, 0))
            image, mask = out["image"], np.asarray(out["mask"]).transpose(2, 0, 1)
        if self.transform is not None:
            image, mask = self.transform.finish(image, mask)
        origin = (y0, x0) if self.patch is not None else None
        item = Item(image, mask, index=self.offset + j, soft=self.soft, origin=origin, pseudo=True)
        return self.sample.item(item)
