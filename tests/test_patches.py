"""Patch training (``data.patch_size``): the patch is the exact cut of the image and of every
mask, foreground patches hold their bone, class weights steer which bone, and a patch
model is validated and predicted with windows of its patch side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bonecomp.config import augment_from_preset
from bonecomp.data.augment import build_augmentation
from bonecomp.data.cache import CacheSpec, open_cache
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.layout import discover
from bonecomp.data.patches import PatchSampler, class_weights, polygon_areas
from bonecomp.data.rasterize import draw, outline, rasterize, to_frame
from bonecomp.inference.ensemble import Ensemble, Member
from bonecomp.inference.tta import views
from bonecomp.testing import assert_same_warp

P = 48  # patch side in the tests (the sampler takes any side; configs want multiples of 32)


@pytest.fixture(scope="module", params=[128, 64], ids=["native", "downsized"])
def cache(request, tiny_root, tmp_path_factory):
    """The tiny phantom (128 px PNGs) cached at its native size (``cv2.fillPoly`` path)
    and at half of it (the sub-pixel drawing path)."""
    return open_cache(
        discover(tiny_root),
        tmp_path_factory.mktemp("c"),
        CacheSpec(request.param),
        workers=1,
        progress=False,
    )


class Fixed(PatchSampler):
    """A sampler that puts every patch at given corners, in turn."""

    def __init__(self, size: int, corners: list[tuple[int, int]]) -> None:
        super().__init__(size, 0.0)
        self.corners = list(corners)

    def origin(self, side, points, offsets, rng):
        return self.corners.pop(0), None


def corners(side: int) -> list[tuple[int, int]]:
    """Both borders, the far corner and an odd inner position."""
    s = min(P, side)
    return [(0, 0), (side - s, side - s), (0, side - s), (side - s, 0), (7, 5)]


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_a_patch_is_the_cut_of_the_image_and_of_every_mask(cache, soft):
    s = cache.size
    for i in (0, 3):
        full = rasterize(cache.polygons(i), cache.src_hw(i), (s, s))
        if soft:  # coverage drawn at the cache's size, then cut: the reference
            pts = to_frame(cache.polygons(i).points, cache.src_hw(i), (s, s))
            full = draw(pts, cache.polygons(i).offsets, (s, s), outline(cache.src_hw(i), (s, s)), 4)
        sites = corners(s)
        ds = BoneDataset(cache, [i], None, soft, 4, compact=True, patch=Fixed(P, sites))
        bone = False
        for y0, x0 in list(sites):
            item = ds[0]
            assert tuple(item["origin"].tolist()) == (y0, x0)
            assert item["image"].shape == (P, P) and item["mask"].shape == (29, P, P)
            assert np.array_equal(item["image"].numpy(), cache.image(i)[y0 : y0 + P, x0 : x0 + P])
            want = full[:, y0 : y0 + P, x0 : x0 + P]
            assert np.array_equal(item["mask"].numpy(), want), (i, y0, x0)
            bone |= bool(want.any())
        assert bone  # not only comparisons of empty masks


@pytest.mark.parametrize(
    "aug",
    [
        augment_from_preset(dict(hflip=1.0, affine_p=1.0, rotate=20, brightness_contrast_p=0.0)),
        augment_from_preset(
            dict(hflip=0.5, vflip=0.5, affine_p=1.0, rotate=30, brightness_contrast_p=1.0)
        ),
    ],
    ids=["flip+affine", "all"],
)
def test_an_augmented_patch_is_the_cut_of_the_augmented_image(cache, aug):
    """The patch's window alone is warped, with the draw albumentations makes for the
    whole image (same seed): it equals the cut of the whole augmented image."""
    sites = corners(cache.size) * 2
    whole = BoneDataset(cache, [2], build_augmentation(aug), True, 4, compact=True)
    cut = BoneDataset(
        cache,
        [2],
        build_augmentation(aug, patch=True),
        True,
        4,
        compact=True,
        patch=Fixed(P, sites),
    )
    flipped, bone = set(), False
    for k, (y0, x0) in enumerate(list(sites)):
        whole.transform.set_random_seed(k)
        cut.transform.set_random_seed(k)
        a, b = whole[0], cut[0]
        flipped.add(tuple(type(t).__name__ for t in whole.transform.head.transforms if t.params))
        assert_same_warp(b["image"], a["image"][y0 : y0 + P, x0 : x0 + P], 0.005)
        assert_same_warp(b["mask"], a["mask"][:, y0 : y0 + P, x0 : x0 + P], 0.005, None)
        bone |= bool(b["mask"].any())
    assert bone  # not only comparisons of empty masks
    assert len(flipped) > 1 or aug[0]["p"] == 1  # "all": flipped and unflipped were drawn


def test_foreground_patches_hold_the_bone_they_were_centred_on(cache):
    s = cache.size
    sampler = PatchSampler(32, foreground=1.0)
    rng = np.random.default_rng(0)
    chosen_any = set()
    for i in range(len(cache)):
        polys = cache.polygons(i)
        pts = to_frame(polys.points, cache.src_hw(i), (s, s))
        for _ in range(20):
            (y0, x0), c = sampler.origin(s, pts, polys.offsets, rng)
            assert c is not None and 0 <= y0 <= s - 32 and 0 <= x0 <= s - 32
            mask = rasterize(polys, cache.src_hw(i), (s, s), window=(y0, x0, 32, 32))
            assert mask[c].any(), (i, c, y0, x0)
            chosen_any.add(c)
    assert len(chosen_any) > 20  # many bones get their turn


def test_without_foreground_share_patches_are_uniform(cache):
    s = cache.size
    polys = cache.polygons(0)
    pts = to_frame(polys.points, cache.src_hw(0), (s, s))
    rng = np.random.default_rng(1)
    got = [PatchSampler(32, 0.0).origin(s, pts, polys.offsets, rng) for _ in range(3000)]
    assert all(c is None for _, c in got)
    ys = np.array([y for (y, _), _ in got])
    assert ys.min() == 0 and ys.max() == s - 32  # every offset is reachable
    assert abs(ys.mean() - (s - 32) / 2) < 0.1 * s


def test_absent_bones_and_bones_moved_out_of_the_image_are_never_chosen():
    def square(cx: float, cy: float) -> np.ndarray:
        return np.array([[cx - 2, cy - 2], [cx + 2, cy - 2], [cx + 2, cy + 2], [cx - 2, cy + 2]])

    # classes: 0 and 4 inside, 1 absent, 2 left of the image, 3 two points only,
    # 5 below the image, 6 absent (last)
    pts = np.concatenate([square(20, 20), square(-30, 40), [[5.0, 5.0], [6, 6]], square(40, 9),
                          square(50, 150)])  # fmt: skip
    offsets = [0, 4, 4, 8, 10, 14, 18, 18]
    rng = np.random.default_rng(0)
    chosen = {PatchSampler(16, 1.0).origin(64, pts, offsets, rng)[1] for _ in range(400)}
    assert chosen == {0, 4}


def test_class_weights_change_how_often_each_bone_is_chosen(cache):
    s = cache.size
    polys = cache.polygons(1)
    pts = to_frame(polys.points, cache.src_hw(1), (s, s))
    n = len(polys)

    def counts(weights):
        rng = np.random.default_rng(2)
        sampler = PatchSampler(32, 1.0, weights)
        picks = [sampler.origin(s, pts, polys.offsets, rng)[1] for _ in range(3000)]
        return np.bincount(picks, minlength=n) / len(picks)

    only = np.zeros(n)
    only[27] = 1.0  # the radius alone
    assert counts(only)[27] == 1.0
    areas = polygon_areas(polys)[None] / np.prod(cache.src_hw(1))
    uniform, by_area = counts(class_weights(areas, "uniform")), counts(class_weights(areas, "area"))
    small, big = int(np.argmin(areas[0])), int(np.argmax(areas[0]))
    assert abs(uniform[small] - 1 / n) < 0.02 and abs(uniform[big] - 1 / n) < 0.02
    assert by_area[small] > 1.5 * uniform[small] and by_area[big] < uniform[big] / 1.5
    # 1/sqrt(area), normalised: the expected share of the smallest bone
    w = 1 / np.sqrt(areas[0])
    assert abs(by_area[small] - w[small] / w.sum()) < 0.02


def test_class_weights_are_one_over_the_root_of_the_mean_area():
    areas = np.array([[4.0, 1.0, 0.0], [4.0, 0.0, 0.0]])  # class 1 in one image, 2 never
    assert np.allclose(class_weights(areas, "area"), [0.5, 1.0, 0.0])
    assert np.allclose(class_weights(areas, "uniform"), [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"data\.patch_balance"):
        class_weights(areas, "median")


def test_polygon_area_is_the_shoelace_area():
    from bonecomp.data.annotations import Polygons

    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]])
    tri = np.array([[0, 0], [4, 0], [0, 3]])
    got = polygon_areas(Polygons.from_list([square, tri, np.zeros((0, 2))]))
    assert np.allclose(got, [100.0, 6.0, 0.0])


# --------------------------------------------------------------------- windows
class Recorder(nn.Module):
    """Position-dependent, not symmetric: the input's first channel plus a ramp over the
    tile's own rows and columns; records every input shape it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        h, w = x.shape[-2:]
        rows = torch.arange(h, dtype=x.dtype)[:, None] / h
        cols = torch.arange(w, dtype=x.dtype)[None, :] / w
        return (x[:, :1] + 2 * rows + 0.7 * cols * rows - 1).expand(-1, 29, -1, -1)


def gaussian(n: int) -> np.ndarray:
    r = np.arange(n) - (n - 1) / 2
    g = np.exp(-0.5 * (r / (0.125 * n)) ** 2)
    return g / g.max()


def dense_windows(model: nn.Module, x: torch.Tensor, tile: int, starts: list[int]) -> np.ndarray:
    """The Gaussian-weighted mean of the model's tile outputs, pixel by pixel, written from
    the definition (tiles at ``starts`` on both axes)."""
    _, _, h, w = x.shape
    g = np.maximum(np.outer(gaussian(tile), gaussian(tile)), 1e-3)
    num, den = np.zeros((x.shape[0], 29, h, w)), np.zeros((h, w))
    for y0 in starts:
        for x0 in starts:
            out = model(x[..., y0 : y0 + tile, x0 : x0 + tile]).double().numpy()
            num[..., y0 : y0 + tile, x0 : x0 + tile] += out * g
            den[y0 : y0 + tile, x0 : x0 + tile] += g
    return num / den


def test_a_patch_member_gets_tiles_of_its_patch_side_at_its_image_size():
    model = Recorder()
    member = Member("patch", model, 96, 1.0, patch_size=32)
    x = torch.rand(2, 3, 96, 96)
    got = Ensemble([member], views(["none"]), overlap=0.5)({96: x})
    assert {s[-2:] for s in model.shapes} == {(32, 32)}
    assert len(model.shapes) == 25  # 5 x 5 windows at stride 16 over 96 px
    want = dense_windows(Recorder(), x, 32, [0, 16, 32, 48, 64])
    assert np.allclose(got.double().numpy(), want, atol=1e-5)  # one member: logits


def test_tta_flips_the_whole_image_then_windows_it():
    """hflip with a non-symmetric model: the view is applied to the whole image, which is
    then tiled (not each tile flipped), and each tile is predicted once per view."""
    model = Recorder()
    x = torch.rand(1, 3, 64, 64)
    member = Member("patch", model, 64, 1.0, patch_size=32)
    got = Ensemble([member], views(["none", "hflip"]), overlap=0.5)({64: x})
    assert len(model.shapes) == 2 * 9 and {s[-2:] for s in model.shapes} == {(32, 32)}
    starts = [0, 16, 32]
    plain = dense_windows(Recorder(), x, 32, starts)
    flipped = dense_windows(Recorder(), x.flip(-1), 32, starts)[..., ::-1]
    want = (1 / (1 + np.exp(-plain)) + 1 / (1 + np.exp(-flipped))) / 2
    assert np.allclose(got.double().numpy(), want, atol=1e-5)
    assert not np.allclose(plain, flipped)  # the flip matters for this model


def test_an_ensemble_of_a_whole_image_and_a_patch_member_is_their_weighted_mean():
    whole, patch = Recorder(), Recorder()
    members = [Member("whole", whole, 32, 1.0), Member("patch", patch, 64, 3.0, patch_size=32)]
    x64 = torch.rand(1, 3, 64, 64)
    x32 = torch.nn.functional.interpolate(x64, size=(32, 32), mode="area")
    got = Ensemble(members, views(["none"]), overlap=0.5)({32: x32, 64: x64})
    assert {s[-2:] for s in whole.shapes} == {(32, 32)} and len(whole.shapes) == 1
    assert len(patch.shapes) == 9
    p_whole = torch.sigmoid(Recorder()(x32))
    p_whole = torch.nn.functional.interpolate(p_whole, size=(64, 64), mode="bilinear")
    p_patch = 1 / (1 + np.exp(-dense_windows(Recorder(), x64, 32, [0, 16, 32])))
    want = (1.0 * p_whole.double().numpy() + 3.0 * p_patch) / 4.0
    assert got.shape == (1, 29, 64, 64)
    assert np.allclose(got.double().numpy(), want, atol=1e-5)
