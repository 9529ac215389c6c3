"""Augmentation presets (albumentations): the grey image and the polygon points move together."""

from __future__ import annotations

import albumentations as A
import cv2

from bonecomp.config import AugmentConfig


def train_transform(cfg: AugmentConfig) -> A.Compose:
    """Flips, shift-scale-rotate, brightness/contrast and optional CLAHE.

    The geometric part moves the image and the polygon points (as keypoints, "xy", pixel
    centres at integers); the Dataset draws the masks at the moved points, which is exact
    and far cheaper than warping 29 mask channels. Pseudo-label maps (``data.pseudo``),
    which have no polygons, are warped as masks, with linear interpolation: they are
    probabilities.
    """
    ops: list[A.BasicTransform] = [
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
