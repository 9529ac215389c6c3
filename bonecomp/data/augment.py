"""Augmentation presets (albumentations), applied jointly to the grey image and its masks."""

from __future__ import annotations

import albumentations as A
import cv2

from bonecomp.config import AugmentConfig


def train_transform(cfg: AugmentConfig, soft_targets: bool = False) -> A.Compose:
    """Flips, shift-scale-rotate, brightness/contrast and optional CLAHE.

    Soft targets are interpolated linearly under the affine warp; hard masks by nearest.
    """
    mask_interp = cv2.INTER_LINEAR if soft_targets else cv2.INTER_NEAREST
    ops: list[A.BasicTransform] = [
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.Affine(
            translate_percent=(-cfg.shift, cfg.shift),
            scale=(1 - cfg.scale, 1 + cfg.scale),
            rotate=(-cfg.rotate, cfg.rotate),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=mask_interp,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
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
    return A.Compose(ops)
