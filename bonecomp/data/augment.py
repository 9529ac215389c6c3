"""Augmentation presets (albumentations): the grey image and the polygon points move together."""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric.functional import warp_affine

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


# Geometric transforms a patch can take as one matrix (see ``draw_geometry``).
_FLIPS = (A.HorizontalFlip, A.VerticalFlip)


@dataclass
class Geometry:
    """One draw of a transform's geometric part, as a single affine ``matrix`` (3 x 3,
    source pixel -> augmented pixel, pixel centres at integers), and the pixel-level ops
    (brightness, CLAHE, ...) that follow it, for a patch to be warped alone.

    Why by hand: albumentations warps the whole image, and a 1024 px patch of a 2048 px
    image would pay for 4x the pixels it keeps; it exposes each transform's drawn matrix
    but no "warp only this window". ``window`` warps exactly the patch's square, which
    equals the crop of the whole warped image (OpenCV computes every output pixel from the
    matrix alone; fixed-point rounding may move a pixel by one grey level). Pixel-level
    ops run on the patch: pointwise ones (brightness, contrast) give what they give on the
    whole image; the random CLAHE (``clahe_p``) sees the patch's tiles.
    """

    matrix: np.ndarray
    pixel_ops: list[A.BasicTransform]
    interpolation: int = cv2.INTER_LINEAR
    mask_interpolation: int = cv2.INTER_LINEAR

    def points(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) x, y source points -> the augmented frame."""
        m = self.matrix
        return pts @ m[:2, :2].T + m[:2, 2]

    def window(self, src: np.ndarray, y0: int, x0: int, p: int, mask: bool = False) -> np.ndarray:
        """The p x p square at (y0, x0) of the augmented ``src`` ((H, W) or (H, W, C)),
        warped from the source alone; zero outside the source, as the whole-image warp."""
        shift = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
        m = shift @ self.matrix
        if np.allclose(m[:2, :2], np.eye(2)) and np.allclose(m[:2, 2], np.round(m[:2, 2])):
            # a plain shift (no flip, no affine drawn): cut the pixels, bit-exact
            dx, dy = round(m[0, 2]), round(m[1, 2])  # output = source + (dx, dy)
            out = np.zeros((p, p, *src.shape[2:]), src.dtype)
            ys, xs = max(0, dy), max(0, dx)
            ye, xe = min(p, src.shape[0] + dy), min(p, src.shape[1] + dx)
            if ye > ys and xe > xs:
                out[ys:ye, xs:xe] = src[ys - dy : ye - dy, xs - dx : xe - dx]
            return out
        flags = self.mask_interpolation if mask else self.interpolation
        return warp_affine(src, m, flags, 0, cv2.BORDER_CONSTANT, (p, p))

    def finish(self, image: np.ndarray) -> np.ndarray:
        """The pixel-level ops, in order, on the warped patch."""
        for op in self.pixel_ops:
            image = op(image=image)["image"]
        return image


def draw_geometry(transform: A.Compose | None, hw: tuple[int, int]) -> Geometry:
    """Draw ``transform``'s random parameters for an image of shape ``hw`` as
    ``transform(image=...)`` would (the same generators, in the same order), without
    warping anything. Supports flips and ``A.Affine`` (constant border) followed by
    pixel-level ops: what ``train_transform`` builds; anything else is refused."""
    matrix = np.eye(3)
    if transform is None:
        return Geometry(matrix, [])
    h, w = hw
    ops: list[A.BasicTransform] = []
    interp = {}
    for t in transform.transforms:
        if isinstance(t, A.ImageOnlyTransform):
            ops.append(t)
            continue
        if ops or not isinstance(t, (*_FLIPS, A.Affine)):
            raise NotImplementedError(
                f"patch training takes flips and Affine before pixel-level ops, got {t!r}"
            )
        if not t.should_apply():
            continue
        if isinstance(t, A.HorizontalFlip):
            step = np.array([[-1.0, 0.0, w - 1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        elif isinstance(t, A.VerticalFlip):
            step = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, h - 1], [0.0, 0.0, 1.0]])
        else:
            if t.border_mode != cv2.BORDER_CONSTANT or t.fill not in (0, 0.0):
                raise NotImplementedError(f"patch training takes a zero constant border: {t!r}")
            params = t.get_params()
            params["shape"] = (h, w)
            step = np.asarray(t.get_params_dependent_on_data(params, {})["matrix"], np.float64)
            interp = {"interpolation": t.interpolation, "mask_interpolation": t.mask_interpolation}
        matrix = step @ matrix
    return Geometry(matrix, ops, **interp)
