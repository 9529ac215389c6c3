"""Benchmark: the data path, ours vs the competition's public baseline.

1. Rasterizing an image's 29 polygons (2048 px source) at 512 and 1024: ours
   (``rasterize(polys, (2048, 2048), (S, S))``, drawn directly at S) vs the baseline
   (``cv2.fillPoly`` of each class at 2048 into a (2048, 2048, 29) array, then
   ``cv2.resize`` INTER_NEAREST to S). Time per image (target >= 100x), and the mean Dice
   of each against the area reference (fill at 2048, average-pool by 2048 / S, >= 0.5):
   ours must be at least the baseline's (checked; exit 1 if not).
2. Training samples per second at 512, one process, no DataLoader: the cached
   ``BoneDataset`` (cache built beforehand, build time and bytes per image printed) with
   (a) no transform and hard masks (the masks drawn from the cached polygons), (b) the
   same as compact uint8 items (what validation with hard targets reads), (c) the
   training transform with soft targets (the default training setup),
   vs the baseline's per-item loading (imread 3-channel, /255 in float64, JSON, fillPoly
   at 2048, resize to 512, CHW torch tensors). Target >= 20x.
3. Patch training (issue 17), augmentation + soft targets throughout: 1024 px patches
   from a 2048 px cache (``BoneDataset(patch=PatchSampler)``: the augmentation drawn for
   the whole image, only the patch's window warped and only its masks drawn) vs the
   whole-image loader at 1024 (the same pixels per sample; target: at least as fast,
   >= 1x), and vs rasterizing the augmented 2048 px image's 29 masks per sample and
   cropping the patch out of them.

Run from the repository root:

    .venv/bin/python benchmarks/bench_data.py            # 5 patients = 10 images
    .venv/bin/python benchmarks/bench_data.py --quick    # smoke mode
    .venv/bin/python benchmarks/bench_data.py --only-patch  # section 3 alone
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from _common import (
    Row,
    base_parser,
    check,
    finish,
    median_time,
    phantom_root,
    print_machine,
    print_table,
)

from bonecomp.classes import CLASS_TO_INDEX, CLASSES
from bonecomp.config import augment_from_preset
from bonecomp.data.annotations import Polygons, load_annotation
from bonecomp.data.augment import build_augmentation
from bonecomp.data.cache import CacheSpec, open_cache
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.layout import discover
from bonecomp.data.patches import PatchSampler, class_weights, polygon_areas
from bonecomp.data.rasterize import rasterize, truth_crops
from bonecomp.testing import dense_dice

SRC = (2048, 2048)


# ------------------------------------------------------------------ the public baseline
def baseline_rasterize(polys: Polygons, size: int) -> np.ndarray:
    """(S, S, 29) uint8: fill each class at 2048 into an HWC label, resize nearest to S."""
    label = np.zeros((*SRC, len(CLASSES)), dtype=np.uint8)
    for c in range(len(CLASSES)):
        class_label = np.zeros(SRC, dtype=np.uint8)
        cv2.fillPoly(class_label, [polys[c]], 1)
        label[..., c] = class_label
    return cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)


class BaselineDataset:
    """The baseline's ``XRayDataset.__getitem__`` with ``A.Resize(S, S)`` as the transform."""

    def __init__(self, image_paths: list[str], json_paths: list[str], size: int) -> None:
        self.image_paths, self.json_paths, self.size = image_paths, json_paths, size

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = cv2.imread(self.image_paths[i])
        image = image / 255.0
        label = np.zeros((*image.shape[:2], len(CLASSES)), dtype=np.uint8)
        with open(self.json_paths[i]) as f:
            annotations = json.load(f)["annotations"]
        for ann in annotations:
            class_label = np.zeros(image.shape[:2], dtype=np.uint8)
            cv2.fillPoly(class_label, [np.array(ann["points"])], 1)
            label[..., CLASS_TO_INDEX[ann["label"]]] = class_label
        s = self.size
        image = cv2.resize(image, (s, s), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (s, s), interpolation=cv2.INTER_NEAREST)
        image = image.transpose(2, 0, 1)
        label = label.transpose(2, 0, 1)
        return torch.from_numpy(image).float(), torch.from_numpy(label).float()


# ------------------------------------------------------------------------------ quality
def area_reference(polys: Polygons, size: int) -> np.ndarray:
    """(29, S, S) bool: the exact 2048 truth (cv2.fillPoly) average-pooled to S, >= 0.5.

    Pooled per class over its bounding box only (``truth_crops``): same result as pooling
    the full (29, 2048, 2048) raster, a fraction of the memory traffic.
    """
    f = SRC[0] // size
    out = np.zeros((len(polys), size, size), bool)
    for c, (y0, x0, crop) in enumerate(truth_crops(polys, SRC)):
        h, w = crop.shape
        if crop.size == 0:
            continue
        r0, r1, c0, c1 = y0 // f, -(-(y0 + h) // f), x0 // f, -(-(x0 + w) // f)
        buf = np.zeros(((r1 - r0) * f, (c1 - c0) * f), np.uint8)
        buf[y0 - r0 * f : y0 - r0 * f + h, x0 - c0 * f : x0 - c0 * f + w] = crop
        sums = buf.reshape(r1 - r0, f, c1 - c0, f).sum(axis=(1, 3))
        out[c, r0:r1, c0:c1] = 2 * sums >= f * f
    return out


# ------------------------------------------------------------------------- patch loader
class CropAfterRaster:
    """The naive patch loader: the augmented image and all its masks at the cache side,
    then the patch cut out of both (what ``data.patch_size`` avoids)."""

    def __init__(self, ds: BoneDataset, side: int, seed: int = 0) -> None:
        self.ds, self.side, self.rng = ds, side, np.random.default_rng(seed)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        y0, x0 = self.rng.integers(0, item["image"].shape[-1] - self.side + 1, 2)
        cut = (..., slice(y0, y0 + self.side), slice(x0, x0 + self.side))
        return {"image": item["image"][cut].clone(), "mask": item["mask"][cut].clone()}


def patch_rows(df, args) -> list[Row]:
    """Section 3: patch samples/s against the whole-image loader at the patch side and the
    rasterize-then-crop way, all with the training augmentation and soft targets.

    Items are compact (uint8 image and coverage, what training's DataLoader workers make
    and ship; the float conversion runs on the device) and each is dropped before the
    next, as a worker does once it has sent it: keeping float items alive would time the
    allocator's fresh pages (121 MiB each), not the loader. Float items are the last row.
    """
    n, big, side = len(df), args.native, args.patch
    aug = build_augmentation(augment_from_preset({}))
    with tempfile.TemporaryDirectory(prefix="bench-patch-") as tmp:
        native = open_cache(df, Path(tmp) / "native", CacheSpec(big), progress=False)
        whole = open_cache(df, Path(tmp) / "whole", CacheSpec(side), progress=False)
        areas = np.stack([polygon_areas(native.polygons(i)) for i in range(n)])
        sampler = PatchSampler(side, 0.33, class_weights(areas, "area"))

        def loaders(compact: bool) -> tuple[BoneDataset, BoneDataset]:
            return (
                BoneDataset(native, None, aug, True, 4, compact, patch=sampler),
                BoneDataset(whole, None, aug, True, 4, compact),
            )

        patched, plain = loaders(True)
        naive = CropAfterRaster(BoneDataset(native, None, aug, True, 4, True), side)
        shapes = {tuple(patched[i]["mask"].shape) for i in range(n)}
        if shapes != {(len(CLASSES), side, side)}:
            raise SystemExit(f"patch loader returned masks of shapes {shapes}")
        bone = np.mean([float((patched[i]["mask"] > 0).sum()) for i in range(n)])
        bone /= np.mean([float((plain[i]["mask"] > 0).sum()) for i in range(n)])
        print(
            f"mask pixels > 0 per sample: a {side} px patch of {big} holds {bone:.2f}x those "
            f"of the whole image at {side} (each patch holds the image's centre)"
        )

        def rate(ds, repeats: int) -> float:
            def one_pass() -> None:
                for i in range(n):
                    ds[i]  # dropped at once, as a worker drops what it has sent

            return n / median_time(one_pass, repeats, 1)

        r_patch, r_whole = rate(patched, args.repeats), rate(plain, args.repeats)
        r_naive = rate(naive, 1)  # 116 MiB of masks per sample: one pass is plenty
        f_patch, f_whole = (rate(ds, args.repeats) for ds in loaders(False))
        what = f"samples/s, {side} px patch of {big}, augment + soft"
        return [
            Row(what + f" (vs whole image at {side})", r_patch, r_whole, "/s", True, 1),
            Row(what + f" (vs raster at {big} + crop)", r_patch, r_naive, "/s", True),
            Row(what + ", float items (vs whole)", f_patch, f_whole, "/s", True),
        ]


# ------------------------------------------------------------------------------ benchmark
def main() -> None:
    parser = base_parser(__doc__, repeats=3, patients=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="raster sizes")
    parser.add_argument("--train-size", type=int, default=512, help="training resolution")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--native", type=int, default=2048, help="patch section: cache side")
    parser.add_argument("--patch", type=int, default=1024, help="patch section: patch side")
    parser.add_argument(
        "--only-patch", action="store_true", help="run section 3 (the patch loader) alone"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.patients, args.sizes = 1, 1, [512]
        args.native, args.patch = 512, 256
    failures: list[str] = []

    with phantom_root(args.data, args.patients, args.seed) as root:
        df = discover(root, "train")
        polys = [load_annotation(p) for p in df["json_path"]]
        n = len(polys)
        print_machine(f", torch threads {torch.get_num_threads()}")
        print(f"{n} training images; {args.repeats} repeat(s)")

        rows = []
        for s in [] if args.only_patch else args.sizes:
            if SRC[0] % s:
                raise SystemExit(f"--sizes: {s} does not divide 2048")
            # Mean over (image, class); also compiles our kernel before timing.
            refs = [area_reference(p, s) for p in polys]
            d_ours = np.mean(
                [dense_dice(rasterize(p, SRC, (s, s)), r) for p, r in zip(polys, refs, strict=True)]
            )
            base = (baseline_rasterize(p, s).transpose(2, 0, 1) for p in polys)
            d_base = np.mean([dense_dice(b, r) for b, r in zip(base, refs, strict=True)])
            del refs
            print(f"{s} px: mean Dice vs area reference: ours {d_ours:.5f}, baseline {d_base:.5f}")
            check(d_ours >= d_base, f"{s} px: ours at least as close to the area truth", failures)
            # Each result is dropped before the next, as when building the cache: keeping
            # all of them alive would time the allocator's fresh pages, not the drawing.
            t_ours = median_time(
                lambda s=s: [rasterize(p, SRC, (s, s)).shape for p in polys], args.repeats
            )
            t_base = median_time(
                lambda s=s: [baseline_rasterize(p, s).shape for p in polys], args.repeats, 0
            )
            rows.append(
                Row(f"rasterize 29 polygons at {s}", t_ours / n, t_base / n, "s", False, 100)
            )
            rows.append(Row(f"  mean Dice vs area truth at {s}", d_ours, d_base, "dice", True))

        s = args.train_size
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
            if args.only_patch:
                rows += patch_rows(df, args)
                print_table("Data path: the patch loader", rows)
                finish(failures)
                return
            t0 = time.perf_counter()
            cache = open_cache(df, Path(cache_dir), CacheSpec(s), progress=False)
            print(f"cache at {s} px built in {time.perf_counter() - t0:.2f} s (not timed below)")
            per_image = sum(f.stat().st_size for f in cache.dir.iterdir()) / n
            print(f"cache at {s} px: {per_image / 2**20:.3f} MiB per image "
                  f"(the image itself: {s * s / 2**20:.3f} MiB)")  # fmt: skip
            plain = BoneDataset(cache)
            compact = BoneDataset(cache, compact=True)
            train = BoneDataset(
                cache, transform=build_augmentation(augment_from_preset({})), soft_targets=True
            )
            old = BaselineDataset(list(df["image_path"]), list(df["json_path"]), s)

            def rate(ds, warmup: int = 1) -> float:  # samples per second, one pass
                return n / median_time(lambda: [ds[i] for i in range(n)], args.repeats, warmup)

            r_base = rate(old, warmup=0)  # slow and steady; the PNGs are in the page cache
            rows.append(
                Row(f"samples/s at {s}, cache, no transform", rate(plain), r_base, "/s", True, 20)
            )
            rows.append(
                Row(f"samples/s at {s}, cache, compact, hard", rate(compact), r_base, "/s", True)
            )
            rows.append(
                Row(f"samples/s at {s}, cache, augment + soft", rate(train), r_base, "/s", True, 20)
            )
            del plain, compact, train, cache
        rows += patch_rows(df, args)
    print_table("Data path: ours vs the public baseline (times per image)", rows)
    finish(failures)


if __name__ == "__main__":
    main()
