"""The cached Dataset: shapes, dtypes, soft targets, augmentation, full-size truth."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from bonecomp.config import augment_from_preset
from bonecomp.data.annotations import load_annotation
from bonecomp.data.augment import Augmentation, build_augmentation
from bonecomp.data.cache import CacheSpec, open_cache
from bonecomp.data.dataset import BoneDataset, to_float_image, to_float_mask
from bonecomp.data.layout import discover
from bonecomp.data.rasterize import rasterize
from bonecomp.testing import dense_truth


@pytest.fixture(scope="module")
def cache(tiny_root, tmp_path_factory):
    return open_cache(
        discover(tiny_root), tmp_path_factory.mktemp("c"), CacheSpec(64), workers=1, progress=False
    )


@pytest.mark.parametrize("soft", [False, True])
def test_item_shapes_and_types(cache, soft):
    ds = BoneDataset(cache, [0, 3], None, soft_targets=soft)
    item = ds[1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (29, 64, 64) and item["mask"].dtype == torch.float32
    assert item["index"] == 3 and item["mask"].is_contiguous()
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert torch.equal(item["image"][0], item["image"][2])  # grey as RGB
    m = item["mask"]
    assert m.min() >= 0 and m.max() <= 1
    if soft:
        assert ((m > 0) & (m < 1)).any()  # fractional edges
    else:
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        want = rasterize(cache.polygons(3), cache.src_hw(3), (64, 64))
        assert torch.equal(m.byte(), torch.from_numpy(want))


def test_soft_targets_agree_with_hard_masks(cache):
    soft = BoneDataset(cache, None, None, soft_targets=True)[2]["mask"]
    hard = BoneDataset(cache, None, None, soft_targets=False)[2]["mask"]
    agree = ((soft >= 0.5) == (hard > 0)).float().mean()
    assert agree > 0.99


def test_train_augmentation_changes_image_and_mask_together(cache):
    aug = build_augmentation(
        augment_from_preset(dict(hflip=1.0, affine_p=0.0, brightness_contrast_p=0.0))
    )
    ds = BoneDataset(cache, [0], aug, soft_targets=False)
    plain = BoneDataset(cache, [0], None, soft_targets=False)[0]
    flipped = ds[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))


def test_augmentation_is_seedable(cache):
    t = build_augmentation(augment_from_preset(dict(affine_p=1.0)))
    ds = BoneDataset(cache, [1], t, soft_targets=True)
    t.set_random_seed(7)
    a = ds[0]
    t.set_random_seed(7)
    b = ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_masks_drawn_at_the_augmented_pose_match_the_warped_image(cache):
    """Keypoints and image move together: the mask drawn from the moved polygons equals
    the unaugmented coverage warped like an image (up to interpolation blur)."""
    warp = A.Compose(
        [A.Affine(rotate=(17, 17), scale=(1.1, 1.1), translate_percent=(0.06, 0.06), p=1)],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )
    plain = BoneDataset(cache, [2], None, soft_targets=True)[0]["mask"]
    ds = BoneDataset(cache, [2], Augmentation(warp), soft_targets=True)
    moved = ds[0]["mask"]
    warped = warp(image=plain.permute(1, 2, 0).numpy(), keypoints=np.zeros((0, 2)))["image"]
    warped = torch.from_numpy(warped).permute(2, 0, 1)
    assert (moved - warped).abs().mean() < 0.01
    assert ((moved > 0.5) == (warped > 0.5)).float().mean() > 0.995
    assert not torch.equal(moved, plain)


def test_cached_polygons_give_the_exact_source_truth(cache, tiny_root):
    """What validation scores against: the cached polygons drawn at the source size equal
    the kit's cv2.fillPoly truth of the JSON file."""
    full = rasterize(cache.polygons(4), cache.src_hw(4))
    assert full.shape == (29, 128, 128)
    json_path = discover(tiny_root)["json_path"][4]
    assert np.array_equal(full, dense_truth(load_annotation(json_path), (128, 128)))


def test_hard_masks_at_the_source_size_are_cv2_fillpoly(tiny_root, tmp_path):
    """A cache at the source size (the 2048 recipe) gives the exact truth as training masks."""
    df = discover(tiny_root)
    full = open_cache(df, tmp_path, CacheSpec(128), workers=1, progress=False)
    mask = BoneDataset(full, [4], None, soft_targets=False, compact=True)[0]["mask"]
    want = dense_truth(load_annotation(df["json_path"][4]), (128, 128))
    assert torch.equal(mask, torch.from_numpy(want))


@pytest.mark.parametrize("soft", [False, True])
def test_compact_items_convert_to_the_float_items(cache, soft):
    plain = BoneDataset(cache, [3], None, soft_targets=soft)[0]
    small = BoneDataset(cache, [3], None, soft_targets=soft, compact=True)[0]
    assert small["image"].dtype == torch.uint8 and small["image"].shape == (64, 64)
    assert small["mask"].dtype == torch.uint8
    assert torch.equal(to_float_image(small["image"][None])[0], plain["image"])
    assert torch.equal(to_float_mask(small["mask"], soft), plain["mask"])
