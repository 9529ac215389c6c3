"""Augmentation presets (albumentations): the grey image and the polygon points move together."""

from __future__ import annotations

import albumentations as A
import cv2

from bonecomp.config import AugmentConfig


def train_transform(cfg: AugmentConfig, crop_jitter: float = 0.0) -> A.Compose:
    """Flips, shift-scale-rotate, brightness/contrast and optional CLAHE; on crops
    (``crop_jitter`` > 0) first a random shift and scale of the crop box by up to that
    share of its side, as a box found from a prediction is off from the truth's.

    The geometric part moves the image and the polygon points (as keypoints, "xy", pixel
    centres at integers); the Dataset draws the masks at the moved points, which is exact
    and far cheaper than warping 29 mask channels. Pseudo-label maps (``data.pseudo_dir``),
    which have no polygons, are warped as masks, with linear interpolation: they are
    probabilities.
    """
    ops: list[A.BasicTransform] = []
    if crop_jitter > 0:
        ops.append(
            A.Affine(
                translate_percent=(-crop_jitter, crop_jitter),
                scale=(1 - crop_jitter, 1 + crop_jitter),
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=1.0,
            )
        )
    ops += [
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.Affine(
            translate_percent=(-cfg.shift, cfg.shift),
            scale=(1 - cfg.scale, 1 + cfg.scale),
            rotate=(-cfg.rotate, cfg.rotate),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_LINEAR,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=cfg.affine_p,
        ),
        A.RandomBrightnessContrast(
            brightness_limit=cfg.brightness_contrast,
            contrast_limit=cfg.brightness_contrast,
            p=cfg.brightness_contrast_p,
        ),
    ]
    if cfg.clahe_p > 0:
        ops.append(A.CLAHE(p=cfg.clahe_p))
    return A.Compose(ops, keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
