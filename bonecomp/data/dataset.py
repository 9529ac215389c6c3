"""Torch Dataset over the training cache, with albumentations transforms."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from bonecomp.data.augment import Augmentation, draw_geometry
from bonecomp.data.cache import TrainCache
from bonecomp.data.images import read_image
from bonecomp.data.patches import PatchSampler
from bonecomp.data.preprocess import NONE, Preprocess
from bonecomp.data.rasterize import draw, outline, rasterize, to_frame
from bonecomp.data.sample import Item, Sample, to_float_image, to_float_mask

__all__ = ["BoneDataset", "TestImages", "to_float_image", "to_float_mask"]


class BoneDataset(Dataset):
    """Items of a training cache: ``{"image": (3,S,S) float in [0,1], "mask": (C,S,S) float,
    "index": cache row}`` and the fields of ``sample`` (``bonecomp.data.sample``: every
    item is made by ``Sample.item`` once the image and mask are final).

    Masks are drawn from the cached polygons at the cache's size: binary (exactly
    ``rasterize``), or with ``soft_targets`` each class's fractional pixel coverage
    (``soft_k`` x ``soft_k`` sub-samples; compact: 0..255, so 0 or 255 for ``soft_k`` 1,
    as ``StepContext.soft_targets`` reads them). With a ``transform`` (see
    ``augment.build_augmentation``) the polygons move with the image as keypoints, the
    masks are drawn at the new pose, and a warped transform (elastic, ...) then moves
    image and masks together. With ``compact`` the image stays uint8 (S, S) and the
    mask uint8 (C, S, S), and ``to_float_image`` / ``to_float_mask`` convert them on the
    device (training does).

    With a ``patch`` sampler (``data.patch_size`` = P) each item is a P x P square of the
    augmented S x S image, placed by the sampler, and only the patch's masks are drawn
    (the crop of the full S x S masks, exactly; ``origin`` gives its (y0, x0)). Only the
    patch's window is warped (``augment.draw_geometry``): the same draw of the
    augmentation as for the whole image, at a quarter of the pixels for P = S / 2.

    ``sample`` (default: the built-in fields of ``patch`` and ``compact``) is the loader's
    contract; training passes one that also makes the fields its loss reads.
    """

    def __init__(
        self,
        cache: TrainCache,
        indices: Sequence[int] | None = None,
        transform: Augmentation | None = None,
        soft_targets: bool = False,
        soft_k: int = 4,
        compact: bool = False,
        patch: PatchSampler | None = None,
        sample: Sample | None = None,
    ) -> None:
        self.sample = sample or Sample(patch=patch is not None, compact=compact)
        if self.sample.patch != (patch is not None) or self.sample.compact != compact:
            raise ValueError(f"{self.sample!r} does not fit patch={patch}, compact={compact}")
        self.cache = cache
        self.patch = patch
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices)
        self.transform = transform
        self.soft_targets = soft_targets
        self.soft_k = soft_k
        self.compact = compact

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        idx = int(self.indices[i])
        s = self.cache.size
        k = self.soft_k if self.soft_targets else 1
        polys, src_hw = self.cache.polygons(idx), self.cache.src_hw(idx)
        points = to_frame(polys.points, src_hw, (s, s))
        y0, x0, p = 0, 0, s
        if self.patch is not None:  # the augmentation drawn, the patch's window warped alone
            p = self.patch.size
            geometry = draw_geometry(self.transform and self.transform.head, (s, s))
            points = geometry.points(points)
            (y0, x0), _ = self.patch.origin(s, points, polys.offsets, self._rng())
            image = geometry.window(self.cache.image(idx, copy=False), y0, x0, p)
            image = geometry.finish(image)
        else:
            image = self.cache.image(idx)
            if self.transform is not None:
                out = self.transform.head(image=image, keypoints=points)
                image, points = out["image"], np.asarray(out["keypoints"])[:, :2]
        if self.transform is None and k == 1:  # cv2.fillPoly where s is the source size
            mask = rasterize(polys, src_hw, (s, s), window=(y0, x0, p, p))
        else:
            shifted = points - np.array([x0, y0], np.float64)
            mask = draw(shifted, polys.offsets, (p, p), outline(src_hw, (s, s)), k)
        if self.soft_targets and k == 1:  # one sub-sample: coverage is 0 or 255, as soft
            mask *= 255  # masks are read (engine.to_device divides them by 255)
        if self.transform is not None:  # warped transforms move image and masks together
            image, mask = self.transform.finish(image, mask)
        origin = (y0, x0) if self.patch is not None else None
        # compact: uint8 through worker IPC and to the device, 4-12x fewer bytes
        item = Item(image, mask, index=idx, soft=self.soft_targets, origin=origin)
        return self.sample.item(item)

    def _rng(self) -> np.random.Generator:
        """The augmentation's generator (seeded per worker and epoch, see
        ``training.data.seed_worker``), else one drawn from numpy's global state."""
        rng = getattr(self.transform, "random_generator", None)
        if rng is None:
            rng = np.random.default_rng(np.random.randint(2**31))  # noqa: NPY002
        return rng


class TestImages(Dataset):
    """Test PNGs for inference: each item holds the image resized to every size the
    ensemble needs (INTER_AREA, as the training cache), as uint8 tensors (S, S), plus
    ``name`` and the source ``hw``. Decoding and resizing run in DataLoader workers.

    ``inputs``: sizes (no preprocessing: ``image<size>``) or ``(size, Preprocess)`` pairs
    (``image<Preprocess.key(size)>``): each member's ``data.preprocess`` is applied to the
    PNG at its source size, once per distinct preprocessing, then resized, as the cache does.
    """

    def __init__(self, table, inputs: Sequence[int | tuple[int, Preprocess]]) -> None:
        self.table = table.reset_index(drop=True)
        pairs = {(int(s[0]), s[1]) if isinstance(s, tuple) else (int(s), NONE) for s in inputs}
        self.inputs = sorted(pairs, key=lambda p: (p[0], p[1].label))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        img = read_image(row["image_path"])
        out: dict = {"name": row["name"], "hw": torch.tensor(img.shape[:2])}
        prepared = {prep: prep(img) for prep in {p for _, p in self.inputs}}
        for s, prep in self.inputs:
            src = prepared[prep]
            small = (
                src
                if src.shape == (s, s)
                else cv2.resize(src, (s, s), interpolation=cv2.INTER_AREA)
            )
            out[f"image{prep.key(s)}"] = torch.from_numpy(np.ascontiguousarray(small))
        return out
