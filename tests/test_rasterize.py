"""Rasterizing: exact at the source size, more accurate than fill-and-resize below it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bonecomp.data.annotations import Polygons, load_annotation
from bonecomp.data.rasterize import class_crop, coverage, draw, rasterize


def _phantom_polys(root, n=4):
    paths = sorted((root / "train" / "outputs_json").glob("*/*.json"))[:n]
    return [load_annotation(p) for p in paths]


def _random_polys(seed=0, size=512, n=29):
    rng = np.random.default_rng(seed)
    polys = []
    for _ in range(n):
        k = int(rng.integers(3, 120))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(5, size / 6) * (1 + 0.3 * np.sin(3 * t + rng.uniform(0, 6)))
        cx, cy = rng.uniform(0, size, 2)  # may cross the border
        pts = np.stack([cx + r * np.cos(t), cy + 1.4 * r * np.sin(t)], 1).round()
        polys.append(pts.astype(np.int32))
    return Polygons.from_list(polys)


def _fill(polys, hw):
    out = np.zeros((len(polys), *hw), np.uint8)
    for c in range(len(polys)):
        cv2.fillPoly(out[c], [polys[c]], 1)
    return out


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (2 * (a & b).sum() + 1e-4) / (a.sum() + b.sum() + 1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_exact_at_source_size(seed):
    polys = _random_polys(seed)
    assert np.array_equal(rasterize(polys, (512, 512)), _fill(polys, (512, 512)))
    assert np.array_equal(rasterize(polys, (512, 512), (512, 512)), _fill(polys, (512, 512)))


@pytest.mark.parametrize("target", [64, 128, 256])
def test_beats_fill_and_resize_against_area_reference(target):
    src = 512
    polys = _random_polys(1, src)
    full = _fill(polys, (src, src))
    f = src // target
    area = full.reshape(len(polys), target, f, target, f).mean((2, 4))
    ref = area >= 0.5
    baseline = np.stack(
        [cv2.resize(m, (target, target), interpolation=cv2.INTER_NEAREST) for m in full]
    )
    ours = rasterize(polys, (src, src), (target, target))
    d_ours = np.mean([_dice(o, r) for o, r in zip(ours, ref, strict=True)])
    d_base = np.mean([_dice(b, r) for b, r in zip(baseline, ref, strict=True)])
    assert d_ours >= d_base
    soft = coverage(polys, (src, src), (target, target), k=4) / 255.0
    assert np.abs(soft - area).mean() < np.abs(ours - area).mean()  # soft is closer still


def test_phantom_overlaps_survive_downscaling(tiny_root):
    polys = _phantom_polys(tiny_root, 1)[0]
    big = rasterize(polys, (128, 128), (512, 512))  # upscaling works too
    assert (big.sum(0) >= 2).any()  # Pisiform/Triquetrum etc. keep their shared pixels
    assert big.dtype == np.uint8 and set(np.unique(big)) <= {0, 1}


def test_non_square_and_out_buffer():
    polys = _random_polys(2, 512)
    out = np.zeros((29, 100, 60), np.uint8)
    got = rasterize(polys, (512, 512), (100, 60), out=out)
    assert got is out and got.any()
    with pytest.raises(ValueError, match="uint8"):
        rasterize(polys, (512, 512), (100, 60), out=np.zeros((29, 10, 10), np.uint8))


def test_sub_sample_counts_must_fit_uint8():
    square = Polygons.from_list([np.array([[0, 0], [63, 0], [63, 63], [0, 63]])])
    full = coverage(square, (64, 64), (16, 16), k=15)
    assert full[:, 1:-1, 1:-1].min() == 255 and full.min() > 240  # no uint8 wrap-around
    with pytest.raises(ValueError, match=r"1\.\.15"):
        coverage(square, (64, 64), (16, 16), k=16)


def test_coverage_bounds_and_full_pixels():
    square = Polygons.from_list([np.array([[0, 0], [63, 0], [63, 63], [0, 63]])])
    cov = coverage(square, (64, 64), (16, 16), k=4)
    assert cov.dtype == np.uint8 and cov.min() == 255  # fully covered everywhere
    cov = coverage(_random_polys(3, 256), (256, 256), (32, 32), k=4)
    assert cov.max() <= 255 and (cov > 0).any() and ((cov > 0) & (cov < 255)).any()


@pytest.mark.parametrize("seed", range(3))
def test_class_crop_equals_full_fill(seed):
    polys = _random_polys(seed, 300)
    full = _fill(polys, (300, 280))
    for c in range(len(polys)):
        y0, x0, crop = class_crop(polys[c], (300, 280))
        rebuilt = np.zeros((300, 280), np.uint8)
        rebuilt[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        assert np.array_equal(rebuilt, full[c])


@pytest.mark.parametrize("k", [2, 4, 7])
def test_coverage_counts_the_sub_samples_a_fine_binary_draw_hits(k):
    """Coverage at k x k sub-samples equals the binary draw at k times the resolution
    (its pixel centres are the sub-samples), summed over each k x k block: the per-pixel
    counting of the coverage path against the plain span fill of the binary one."""
    rng = np.random.default_rng(k)
    pts, offsets = [], [0]
    for _ in range(12):  # float outlines, some crossing the border, some self-crossing
        m = int(rng.integers(3, 40))
        t = np.sort(rng.uniform(0, 2 * np.pi, m)) if rng.random() < 0.7 else rng.uniform(0, 7, m)
        r = rng.uniform(2, 14)
        pts.append(rng.uniform(-4, 44, 2) + np.stack([np.cos(t), 1.3 * np.sin(t)], 1) * r)
        offsets.append(offsets[-1] + m)
    pts, offsets = np.concatenate(pts), np.array(offsets)
    grow = (0.37, 0.21)
    got = draw(pts, offsets, (40, 36), grow, k)
    fine = draw((pts + 0.5) * k - 0.5, offsets, (40 * k, 36 * k), (grow[0] * k, grow[1] * k), 1)
    counts = fine.reshape(len(offsets) - 1, 40, k, 36, k).sum((2, 4))
    want = np.round(counts * 255.0 / (k * k)).astype(np.uint8)
    assert ((want > 0) & (want < 255)).sum() > 100  # many partly covered pixels
    assert np.array_equal(got, want), (got != want).sum()
