"""``data.augment``: albumentations transforms named in the recipe, checked with the config,
moving the masks with the image for each geometric kind, the old preset's stream kept."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from bonecomp.checks import check_config
from bonecomp.config import ConfigError, augment_from_preset, config_from_saved, load_config
from bonecomp.data.augment import EXACT, NAME, WARPED, build_augmentation, kind
from bonecomp.data.cache import CacheSpec, open_cache
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.layout import discover
from bonecomp.data.patches import PatchSampler
from bonecomp.testing import tiny_config
from bonecomp.training.fold import run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S = 64


def t(name: str, **args) -> dict:
    return {NAME: name, **args}


@pytest.fixture(scope="module")
def cache(tiny_root, tmp_path_factory):
    return open_cache(
        discover(tiny_root), tmp_path_factory.mktemp("c"), CacheSpec(S), workers=1, progress=False
    )


def test_the_default_list_is_the_old_preset_random_stream_included():
    """The old preset, written out as the code of earlier versions built it (a vertical
    flip of p 0 included), and the default list give the same images and points for the
    same seed."""
    old = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.0),
            A.Affine(
                translate_percent=(-0.06, 0.06),
                scale=(0.9, 1.1),
                rotate=(-20, 20),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )
    new = build_augmentation(load_config(CONFIGS / "demo.yaml").data.augment)
    assert new.tail is None
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 96), dtype=np.uint8)
    points = rng.uniform(0, 95, (40, 2))
    old.set_random_seed(11)
    new.set_random_seed(11)
    for _ in range(20):
        a, b = old(image=image, keypoints=points), new.head(image=image, keypoints=points)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])


def test_an_old_saved_preset_trains_as_it_did():
    """A run folder of an earlier version saved ``data.augment`` as the preset mapping."""
    raw = {"data": {"augment": {"hflip": 0.3, "rotate": 5.0, "clahe_p": 0.2}}}
    got = config_from_saved(raw, "old/config.yaml").data.augment
    names = [e[NAME] for e in got]
    assert names == ["HorizontalFlip", "Affine", "RandomBrightnessContrast", "CLAHE"]
    assert got[0]["p"] == 0.3 and got[1]["rotate"] == [-5.0, 5.0] and got[3]["p"] == 0.2
    assert augment_from_preset({}) == load_config().data.augment


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (
            t("GausNoise", p=0.5),
            "unknown albumentations transform 'GausNoise'; did you mean GaussNoise",
        ),
        (t("HorizontalFlip", probability=0.5), "HorizontalFlip takes no probability; it takes p"),
        (t("GaussNoise", std_range=[0.5, 0.1]), "GaussNoise: std_range: Value error"),
        (t("RandomCrop", height=32, width=32), "RandomCrop changes the training size"),
        (t("OneOf", transforms=[]), "OneOf is a container"),
        (t("ElasticTransform", mask_interpolation=1), "mask_interpolation is bonecomp's"),
        ({"name": "HorizontalFlip"}, "expected a mapping with __class_fullname__"),
        (t("PlanckianJitter"), "PlanckianJitter fails on a grey image"),
        (t("ToRGB"), "ToRGB turns a grey uint8 image into a uint8 one of shape (64, 64, 3)"),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_key_the_entry_and_what_is_accepted(
    tiny_root, tmp_path, entry, words
):
    cfg = tiny_config(tiny_root, tmp_path, **{"data.augment": [t("HorizontalFlip"), entry]})
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "data.augment[1]: " in msg and words in msg, msg
    assert msg.startswith("command line: ")


def test_order_and_patch_rules_are_config_errors(tiny_root, tmp_path):
    late = [t("ElasticTransform"), t("HorizontalFlip")]
    with pytest.raises(ConfigError, match=r"data.augment\[1\]: HorizontalFlip comes after"):
        check_config(tiny_config(tiny_root, tmp_path, **{"data.augment": late}))
    patch = {"data.augment": [t("RandomRotate90")], "data.patch_size": 32}
    with pytest.raises(ConfigError, match=r"data.augment\[0\]: RandomRotate90 with data.patch"):
        check_config(tiny_config(tiny_root, tmp_path, **patch))
    old = tmp_path / "old.yaml"  # a recipe of an earlier version
    old.write_text("data:\n  augment:\n    hflip: 0.5\n")
    with pytest.raises(ConfigError, match=r"old.yaml: data.augment is now a list") as e:
        load_config(old)
    assert "\n" not in str(e.value)


# each exact kind, drawn so that it moves the image (p 1, ranges away from identity)
EXACT_ENTRIES = [
    t("HorizontalFlip", p=1), t("VerticalFlip", p=1), t("Transpose", p=1),
    t("RandomRotate90", p=1), t("D4", p=1), t("SquareSymmetry", p=1),
    t("Affine", rotate=[17, 17], scale=[1.1, 1.1], translate_percent=[0.06, 0.06], p=1),
    t("ShiftScaleRotate", shift_limit=0.05, scale_limit=0.1, rotate_limit=[15, 25],
      border_mode=0, p=1),
    t("Rotate", limit=[15, 25], border_mode=0, p=1),
    t("SafeRotate", limit=[15, 25], border_mode=0, p=1),
    t("Perspective", scale=[0.05, 0.1], p=1),
]  # fmt: skip
WARPED_ENTRIES = [
    t("ElasticTransform", alpha=40.0, sigma=4.0, p=1),
    t("GridDistortion", num_steps=4, distort_limit=0.4, p=1),
    t("OpticalDistortion", distort_limit=0.6, p=1),
    t("PiecewiseAffine", scale=[0.04, 0.06], p=1),
    t("ThinPlateSpline", scale_range=[0.15, 0.2], p=1),
    t("GridElasticDeform", num_grid_xy=[4, 4], magnitude=6, p=1),
]


def test_every_geometric_transform_we_take_has_a_case():
    names = {e[NAME] for e in EXACT_ENTRIES + WARPED_ENTRIES}
    assert names >= {c.__name__ for c in (*EXACT, *WARPED)}
    assert {kind(build_augmentation([e]).head.transforms[0]) for e in EXACT_ENTRIES} == {"exact"}


@pytest.mark.parametrize("entry", EXACT_ENTRIES, ids=lambda e: e[NAME])
def test_masks_drawn_at_the_moved_points_match_the_warped_masks(cache, entry):
    """An exact transform moves the polygon points: the masks drawn there equal the
    unaugmented coverage warped by the same draw like an image (up to interpolation)."""
    aug = build_augmentation([entry], soft=True)
    plain = BoneDataset(cache, [2], None, soft_targets=True)[0]["mask"]
    aug.set_random_seed(5)
    moved = BoneDataset(cache, [2], aug, soft_targets=True)[0]["mask"]
    aug.set_random_seed(5)
    warped = aug.head(image=plain.permute(1, 2, 0).numpy(), keypoints=np.zeros((0, 2)))
    warped = torch.from_numpy(np.ascontiguousarray(warped["image"])).permute(2, 0, 1)
    assert not torch.equal(moved, plain)
    assert (moved - warped).abs().mean() < 0.01, entry
    assert ((moved > 0.5) == (warped > 0.5)).float().mean() > 0.995, entry


class Corner(PatchSampler):
    """Every patch at (y0, x0)."""

    def __init__(self, size: int, corner: tuple[int, int]) -> None:
        super().__init__(size, 0.0)
        self.corner = corner

    def origin(self, side, points, offsets, rng):
        return self.corner, None


@pytest.mark.parametrize("patch", [False, True], ids=["whole", "patch"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("entry", WARPED_ENTRIES, ids=lambda e: e[NAME])
def test_a_warped_transform_moves_the_masks_with_the_image(cache, monkeypatch, entry, soft, patch):
    """The image is made to be one bone's mask (255 inside): after a warped transform the
    image and that bone's mask must still coincide, so both were moved by one field, hard
    masks staying 0/1 (nearest) and soft ones interpolated like the image."""
    c, k = 22, 4 if soft else 1  # the capitate, in the middle of the hand
    coverage = BoneDataset(cache, [2], None, soft_targets=soft, soft_k=k, compact=True)[0]["mask"]
    coded = coverage[c].numpy().astype(np.uint8) * (1 if soft else 255)
    monkeypatch.setattr(cache, "image", lambda i, copy=True: coded.copy())
    sampler = Corner(32, (16, 16)) if patch else None
    aug = build_augmentation([entry], soft=soft, patch=patch)
    assert aug.tail is not None and not aug.head.transforms
    aug.set_random_seed(3)
    ds = BoneDataset(cache, [2], aug, soft_targets=soft, soft_k=k, compact=True, patch=sampler)
    item = ds[0]
    image, mask = item["image"].numpy().astype(float), item["mask"][c].numpy().astype(float)
    before = coded[16:48, 16:48] if patch else coded
    assert image.shape == before.shape and not np.array_equal(image, before), "nothing warped"
    if soft:
        assert np.abs(image - mask).mean() < 1.0  # grey levels: one field, one interpolation
    else:
        assert set(np.unique(item["mask"].numpy())) <= {0, 1}
        assert ((image >= 128) == (mask > 0)).mean() > 0.98


def test_recipe_transforms_train_with_whole_images_and_patches(tiny_root, tmp_path):
    """Every transform a recipe in configs/ names, and the intensity set of the appearance
    study, each drawn every time (p 1), trains a few steps, whole images and patches."""
    named: dict[str, dict] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        for e in load_config(path).data.augment:
            named.setdefault(e[NAME], e)
    intensity = [
        t("RandomGamma", gamma_limit=[70, 150]), t("GaussNoise", std_range=[0.02, 0.06]),
        t("GaussianBlur", blur_limit=[3, 5]), t("Downscale", scale_range=[0.5, 0.9]),
    ]  # fmt: skip
    for e in intensity:
        named.setdefault(e[NAME], e)
    assert {"ElasticTransform", "CLAHE", "Affine", "HorizontalFlip"} <= set(named)
    entries = [{**e, "p": 1.0} for e in named.values()]
    entries.sort(key=lambda e: kind(build_augmentation([e]).head.transforms[0])
                 if build_augmentation([e]).head.transforms else "warped")  # fmt: skip
    for i, patch in enumerate((None, 32)):
        keys = {"data.augment": entries, "data.patch_size": patch, "train.epochs": 1}
        cfg = tiny_config(tiny_root, tmp_path / str(i), **keys)
        check_config(cfg)
        result = run_training(cfg, fold=0, progress=False)
        assert np.isfinite(result.best_dice), patch
