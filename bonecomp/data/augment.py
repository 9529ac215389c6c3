"""Training augmentation from ``data.augment``: a list of albumentations transforms in
albumentations' own serialised form (``{__class_fullname__: Affine, rotate: [-5, 5], p: 0.7}``,
what ``A.to_dict`` writes), checked when the config is, built into an ``Augmentation``.

Each transform is one of three kinds, which decides how the masks follow the image:

- *pixel* (``A.ImageOnlyTransform``: brightness, gamma, noise, blur, CLAHE, ...): the
  image only;
- *exact* (flips, rotations by 90 degrees, ``Affine`` and its kin, ``Perspective``): they
  move the polygon points (as keypoints, "xy", pixel centres at integers) with the image;
  the Dataset draws the masks at the moved points, which is exact and far cheaper than
  warping 29 mask channels;
- *warped* (elastic, grid, optical, piecewise-affine and thin-plate distortions): they
  cannot move points exactly, so they warp the drawn masks with the image (nearest for
  hard targets, which stay 0/1; linear for soft ones, which are coverages).

The exact transforms come before the first warped one (the masks are drawn in between):
``Augmentation.head`` runs on image and points, ``Augmentation.tail`` (from the first
warped transform on) on image and drawn masks. Other dual transforms (crops, resizes,
pads) change the training size and are refused, as are albumentations' containers
(``OneOf``, ...): give each transform its own ``p``.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric.functional import warp_affine
from pydantic import ValidationError

from bonecomp.config import ConfigError, DataConfig

NAME = "__class_fullname__"  # albumentations' key for the transform's class
EXACT = (
    A.HorizontalFlip, A.VerticalFlip, A.Transpose, A.RandomRotate90, A.D4, A.SquareSymmetry,
    A.Affine, A.Rotate, A.SafeRotate, A.Perspective,
)  # fmt: skip
WARPED = (
    A.ElasticTransform, A.GridDistortion, A.OpticalDistortion, A.PiecewiseAffine,
    A.ThinPlateSpline, A.GridElasticDeform,
)  # fmt: skip
_FLIPS = (A.HorizontalFlip, A.VerticalFlip)
PATCH_EXACT = (*_FLIPS, A.Affine)  # what ``draw_geometry`` warps a patch's window by


def kind(t: A.BasicTransform | type) -> str:
    """``"pixel"``, ``"exact"`` or ``"warped"`` (see the module docstring); ``""`` if
    none (refused by ``check_augment``)."""
    cls = t if isinstance(t, type) else type(t)
    if issubclass(cls, A.ImageOnlyTransform):
        return "pixel"
    if issubclass(cls, WARPED):
        return "warped"
    return "exact" if issubclass(cls, EXACT) else ""


@dataclass
class Augmentation:
    """``head`` (exact and pixel transforms before the first warped one) runs on the image
    and the polygon points; ``tail`` (the rest, or ``None``) on the image and the masks
    drawn at the moved points. Seeded together (``set_random_seed``)."""

    head: A.Compose
    tail: A.Compose | None = None

    def set_random_seed(self, seed: int) -> None:
        self.head.set_random_seed(seed)
        if self.tail is not None:
            self.tail.set_random_seed((seed + 1) % 2**32)

    @property
    def random_generator(self) -> np.random.Generator:
        """The head's numpy generator (the patch sampler draws from it too)."""
        return self.head.random_generator

    def finish(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tail on ``image`` and the (C, H, W) ``mask`` together (as they are without)."""
        if self.tail is None:
            return image, mask
        out = self.tail(image=image, mask=np.ascontiguousarray(mask.transpose(1, 2, 0)))
        return out["image"], np.ascontiguousarray(np.asarray(out["mask"]).transpose(2, 0, 1))


def transform_class(entry: Any, key: str) -> type[A.BasicTransform]:
    """The albumentations class an entry names; one-line ``ConfigError`` otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get(NAME), str):
        raise ConfigError(
            f"{key}: expected a mapping with {NAME}: <transform> and its arguments "
            f"(albumentations' to_dict form), got {entry!r}",
            key,
        )
    name = entry[NAME].rsplit(".", 1)[-1]
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        names = [n for n, c in vars(A).items() if isinstance(c, type)]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{key}: unknown albumentations transform {entry[NAME]!r}{hint} (the names of "
            f"albumentations {A.__version__}'s transforms, as in its to_dict)",
            key,
        )
    return cls


def build_transform(entry: dict[str, Any], key: str, soft: bool = False) -> A.BasicTransform:
    """One entry built; an unknown transform or argument, a bad value or a transform of no
    kind is one ``ConfigError`` line naming ``key`` (``data.augment[i]``)."""
    cls = transform_class(entry, key)
    name = cls.__name__
    if issubclass(cls, A.BaseCompose):
        raise ConfigError(f"{key}: {name} is a container; list its transforms, each its p", key)
    if not kind(cls):
        raise ConfigError(
            f"{key}: {name} changes the training size or moves points in a way bonecomp does "
            f"not follow; geometric transforms it takes: "
            f"{', '.join(c.__name__ for c in (*EXACT, *WARPED))}",
            key,
        )
    args = {k: v for k, v in entry.items() if k not in (NAME, "__version__")}
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        takes = ", ".join(accepted)
        raise ConfigError(f"{key}: {name} takes no {', '.join(unknown)}; it takes {takes}", key)
    if kind(cls) == "warped":
        if "mask_interpolation" in args:
            raise ConfigError(
                f"{key}: {name}: mask_interpolation is bonecomp's (nearest for hard targets, "
                "linear for soft ones); remove it",
                key,
            )
        args["mask_interpolation"] = cv2.INTER_LINEAR if soft else cv2.INTER_NEAREST
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls(**args)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"{x}: " for x in err["loc"])
        raise ConfigError(f"{key}: {name}: {where}{err['msg']}", key) from None
    except (TypeError, ValueError) as e:  # albumentations re-raises its schema's errors
        lines = [x.strip() for x in str(e).splitlines()] or [type(e).__name__]
        if "validation error" in lines[0] and len(lines) > 2:  # field, then its message
            lines = [f"{lines[1]}: {lines[2].split(' [type=')[0]}"]
        raise ConfigError(f"{key}: {name}: {lines[0]}", key) from None


def build_augmentation(
    entries: list[dict[str, Any]],
    *,
    crop_jitter: float = 0.0,
    soft: bool = False,
    patch: bool = False,
) -> Augmentation | None:
    """``data.augment`` built (``None`` for an empty list without crop jitter); on crops
    (``crop_jitter`` > 0) first a random shift and scale of the crop box by up to that
    share of its side, as a box found from a prediction is off from the truth's. ``soft``:
    the targets are coverages (warped linearly); ``patch``: the exact transforms must be
    ones a patch's window can be warped by alone (``draw_geometry``)."""
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
    tail: list[A.BasicTransform] = []
    for i, entry in enumerate(entries):
        key = f"data.augment[{i}]"
        t = build_transform(entry, key, soft=soft)
        k = kind(t)
        if k == "exact" and tail:
            raise ConfigError(
                f"{key}: {type(t).__name__} comes after the warped {type(tail[0]).__name__}; "
                "list the exact geometric transforms first (the masks are drawn between)",
                key,
            )
        if k == "exact" and patch and not isinstance(t, PATCH_EXACT):
            raise ConfigError(
                f"{key}: {type(t).__name__} with data.patch_size: patch training warps a "
                "patch's window by flips and Affine (or ShiftScaleRotate) only; use those",
                key,
            )
        if k == "exact" and patch and any(kind(o) == "pixel" for o in ops):
            raise ConfigError(
                f"{key}: {type(t).__name__} with data.patch_size: list the pixel transforms "
                "after the geometric ones (a patch is warped first, then finished)",
                key,
            )
        (tail if tail or k == "warped" else ops).append(t)
    if not ops and not tail:
        return None
    points = A.KeypointParams(format="xy", remove_invisible=False)
    with warnings.catch_warnings():  # a head of pixel transforms only: the points stay
        warnings.filterwarnings("ignore", "Got processor for keypoints", UserWarning)
        head = A.Compose(ops, keypoint_params=points)
    return Augmentation(head, A.Compose(tail) if tail else None)


def check_augment(data: DataConfig) -> None:
    """``data.augment`` builds, and runs once on a small grey image with every transform
    applied (a transform that cannot take a grey uint8 image fails here, in one line)."""
    aug = build_augmentation(
        data.augment, soft=data.soft_targets, patch=data.patch_size is not None
    )
    if aug is None:
        return
    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    mask = np.zeros((2, 64, 64), np.uint8)
    for i, t in enumerate([*aug.head.transforms, *(aug.tail.transforms if aug.tail else [])]):
        key, name = f"data.augment[{i}]", type(t).__name__
        try:
            if kind(t) == "pixel":
                out = t(image=image, force_apply=True)["image"]
            else:
                out = t(image=image, mask=mask.transpose(1, 2, 0), force_apply=True)["image"]
        except Exception as e:  # any failure of the user's transform is reported
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{key}: {name} fails on a grey image: {msg}", key) from None
        if out.shape != image.shape or out.dtype != image.dtype:
            raise ConfigError(
                f"{key}: {name} turns a grey {image.dtype} image into a {out.dtype} one of shape "
                f"{out.shape}; training images stay grey uint8 of their size",
                key,
            )


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
    whole image; a random ``CLAHE`` sees the patch's tiles.
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
    pixel-level ops: a head ``build_augmentation(patch=True)`` builds; anything else is refused."""
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
