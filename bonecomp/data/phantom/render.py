"""Turn a hand's pixel polygons and soft-tissue geometry into the 8-bit X-ray image.

Dark background, soft tissue by path length, bones with textured marrow and bright
cortices (densities add where bones overlap), metal artefacts, uneven exposure, detector
blur and noise, the patient's contrast and processing curve, a burnt-in side marker and
text labels.

How a data set looks as a whole is its ``Appearance``: ``default`` is the phantom every
figure of the project was measured on; ``film`` is a second look (an S-shaped film curve,
brighter and thicker soft tissue, less bone contrast, coarser trabeculae, detector blur
and more noise) for training on one appearance and validating on the other. The bones,
poses and labels do not depend on the appearance: only the pixels do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from bonecomp.data.phantom.anatomy import CORTEX_MM, REF_SIZE
from bonecomp.data.phantom.artefacts import draw_metal, draw_texts

Range = tuple[float, float]


@dataclass(frozen=True)
class Appearance:
    """How a whole data set looks: the ranges the patients' and images' draws come from,
    and the steps every image gets. Each range is drawn as ``rng.uniform(*range)`` at the
    same point of the same random stream whatever the appearance, so two appearances of a
    seed hold the same hands."""

    name: str
    gamma: Range = (0.75, 1.35)  # per patient: processing curve exponent
    contrast: Range = (0.8, 1.15)  # per patient
    offset: Range = (-12.0, 12.0)  # per patient: grey levels after the curve
    tissue: Range = (45.0, 70.0)  # per image: soft-tissue grey at full thickness
    background: Range = (8.0, 25.0)  # per image
    marrow: Range = (40.0, 60.0)  # per image: bone marrow grey (times the bone density)
    cortex: Range = (65.0, 95.0)  # per image: cortical rim grey
    gradient: float = 0.12  # +- exposure gradient across the image
    noise: Range = (2.0, 5.0)  # per image: detector mottle (grey levels, std)
    grain_mm: float = 0.15  # trabecular texture grain
    texture: float = 0.15  # trabecular texture amplitude (relative)
    blur_mm: float = 0.0  # detector blur (Gaussian sigma) before the noise; 0: none
    film: float = 0.0  # S-shaped film curve steepness; 0: the plain gamma curve


APPEARANCES: dict[str, Appearance] = {
    a.name: a
    for a in (
        Appearance("default"),
        Appearance(
            "film",
            gamma=(0.9, 1.5),
            contrast=(0.7, 1.0),
            offset=(0.0, 20.0),
            tissue=(70.0, 105.0),
            background=(18.0, 40.0),
            marrow=(24.0, 36.0),
            cortex=(38.0, 58.0),
            gradient=0.2,
            noise=(6.0, 10.0),
            grain_mm=0.5,
            texture=0.3,
            blur_mm=0.25,
            film=6.0,
        ),
    )
}


def get_appearance(name: str) -> Appearance:
    """The named appearance; an unknown name is a ``ValueError`` listing the valid ones."""
    if name not in APPEARANCES:
        raise ValueError(f"unknown appearance {name!r}; valid: {', '.join(APPEARANCES)}")
    return APPEARANCES[name]


@dataclass(frozen=True)
class Acquisition:
    """How a patient's films were exposed and processed; both hands are filmed alike, so
    intensity differs mostly between patients."""

    tissue: float  # soft-tissue brightness factor (attenuation of the patient's tissue)
    gamma: float  # processing curve: > 1 darkens the mid-tones
    contrast: float
    offset: float  # grey levels added after the curve
    appearance: Appearance = APPEARANCES["default"]


def sample_acquisition(
    rng: np.random.Generator, appearance: Appearance = APPEARANCES["default"]
) -> Acquisition:
    """One patient's exposure and processing."""
    return Acquisition(
        tissue=rng.uniform(0.8, 1.25),
        gamma=rng.uniform(*appearance.gamma),
        contrast=rng.uniform(*appearance.contrast),
        offset=rng.uniform(*appearance.offset),
        appearance=appearance,
    )


def render(
    polygons: list[np.ndarray],
    tissue: dict,
    size: int,
    px_per_mm: float,
    density: float,
    mirrored: bool,
    rng: np.random.Generator,
    look: Acquisition,
    metal: Sequence[tuple[np.ndarray, float]] = (),
    texts: tuple[str, ...] = (),
) -> np.ndarray:
    """Compose the X-ray: dark background, soft tissue, bones with bright cortices, metal,
    uneven exposure, noise, the patient's processing curve, a side marker and text labels.

    ``tissue`` (pixels): ``hulls`` as (points, padding) and ``strokes`` as (start, end,
    thickness); ``metal`` (pixels): outlines with their attenuation (grey levels added).
    """
    a = look.appearance
    grain = np.random.default_rng(rng.integers(2**63))  # noise fields, whose size varies
    low = max(64, size // 4)
    tissue_low = _tissue_mask(_scaled(tissue, low / size), low)
    soft = _tissue_thickness(tissue_low, px_per_mm * low / size)
    soft = cv2.resize(soft, (size, size), interpolation=cv2.INTER_LINEAR)
    soft *= rng.uniform(*a.tissue) * look.tissue
    soft += rng.uniform(*a.background)
    texture = _trabeculae(size, px_per_mm, grain, a)
    image = _bone_layer(polygons, size, px_per_mm, density, texture, rng, a)  # float32
    image += soft
    draw_metal(image, metal)
    image *= _exposure(size, rng, a.gradient)
    if a.blur_mm > 0:  # the detector's blur acts on the signal, before its noise
        image = cv2.GaussianBlur(image, (0, 0), a.blur_mm * px_per_mm)
    image += _mottle(size, rng.uniform(*a.noise), grain)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)
    image = cv2.LUT(image, _curve(look))
    _draw_marker(image, "L" if mirrored else "R", tissue_low, rng)
    draw_texts(image, texts, tissue_low, rng)
    return image


def _curve(look: Acquisition) -> np.ndarray:
    """The processing curve as a 256-entry lookup table: gamma (then, for a film
    appearance, an S-shaped characteristic curve), then contrast and offset."""
    grey = np.arange(256) / 255.0
    curved = grey**look.gamma
    k = look.appearance.film
    if k > 0:  # logistic film curve through the mid-tones, rescaled to [0, 1]
        ends = 1 / (1 + np.exp(-k * (np.array([0.0, 1.0]) - 0.5)))
        curved = (1 / (1 + np.exp(-k * (curved - 0.5))) - ends[0]) / (ends[1] - ends[0])
    out = 255.0 * curved * look.contrast + look.offset
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _tissue_mask(tissue: dict, low: int) -> np.ndarray:
    """Binary soft-tissue silhouette (uint8 0/1) at ``low`` x ``low`` pixels.

    Palm and forearm are convex hulls widened by their padding; each phalanx is a thick
    round-capped stroke.
    """
    mask = np.zeros((low, low), np.uint8)
    for points, pad in tissue["hulls"]:
        hull = cv2.convexHull(np.rint(points).astype(np.int32))
        cv2.fillPoly(mask, [hull], 1)
        cv2.polylines(mask, [hull], True, 1, thickness=max(1, round(2 * pad)))
    for a, b, thickness in tissue["strokes"]:
        start, end = (tuple(int(v) for v in np.rint(p)) for p in (a, b))
        cv2.line(mask, start, end, 1, thickness=max(1, round(thickness)))
    return mask


def _tissue_thickness(mask: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Relative X-ray path length through the soft tissue (0..1, float32).

    Limbs are roughly cylindrical, so the path length rises steeply at the skin line and
    flattens inside; a small blur softens the skin line.
    """
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3) / (7.0 * px_per_mm)
    thickness = np.sqrt(1 - (1 - np.minimum(depth, 1)) ** 2)
    return cv2.GaussianBlur(thickness, (0, 0), max(0.5, 0.6 * px_per_mm))


def _scaled(tissue: dict, f: float) -> dict:
    """Tissue geometry (pixels) scaled by ``f``."""
    return {
        "hulls": [(p * f, pad * f) for p, pad in tissue["hulls"]],
        "strokes": [(a * f, b * f, t * f) for a, b, t in tissue["strokes"]],
    }


def _bone_layer(
    polygons: list[np.ndarray],
    size: int,
    px_per_mm: float,
    density: float,
    texture: np.ndarray,
    rng: np.random.Generator,
    look: Appearance,
) -> np.ndarray:
    """Sum of bone densities: each polygon filled with textured marrow and a bright cortex.

    Densities add where bones overlap, as attenuation does. The layer is blurred slightly so
    the edges look photographic; the half-intensity contour stays on the polygon.
    """
    layer = np.zeros((size, size), np.float32)
    marrow = rng.uniform(*look.marrow) * density
    cortex = rng.uniform(*look.cortex)
    for c, poly in enumerate(polygons):
        x0, y0 = np.maximum(poly.min(0) - 1, 0)
        x1, y1 = np.minimum(poly.max(0) + 2, size)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [poly], 1, offset=(-int(x0), -int(y0)))
        dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        band = 1 / (1 + (dist / max(0.7, CORTEX_MM[c] * px_per_mm)) ** 4)
        value = marrow * rng.uniform(0.9, 1.1) * texture[y0:y1, x0:x1] + cortex * band
        layer[y0:y1, x0:x1] += value * mask
    return cv2.GaussianBlur(layer, (0, 0), max(0.3, 0.12 * px_per_mm))


def _trabeculae(
    size: int, px_per_mm: float, rng: np.random.Generator, look: Appearance
) -> np.ndarray:
    """Multiplicative marrow texture around 1: smoothed noise with sub-millimetre grain."""
    low = max(32, size // 4)
    noise = rng.standard_normal((low, low), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), max(0.5, look.grain_mm * px_per_mm * low / size))
    noise = 1 + noise * (look.texture / max(float(noise.std()), 1e-6))
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)


def _exposure(size: int, rng: np.random.Generator, gradient: float) -> np.ndarray:
    """Smooth multiplicative field: a random linear gradient (+- ``gradient``) and a
    vignette."""
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    gx, gy = (float(g) for g in rng.uniform(-gradient, gradient, 2))
    vignette = rng.uniform(0.05, 0.2)
    return (1 + gx * axis - vignette * axis**2)[None, :] + (gy * axis - vignette * axis**2)[:, None]


def _mottle(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Detector noise, drawn at half resolution (quantum mottle is slightly correlated)."""
    noise = rng.standard_normal((size // 2, size // 2), dtype=np.float32)
    noise *= sigma
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)


def _draw_marker(
    image: np.ndarray, letter: str, tissue_low: np.ndarray, rng: np.random.Generator
) -> None:
    """Burn the side letter into a corner, the first in a random order that is clear of tissue."""
    size = image.shape[0]
    scale = 4.0 * size / REF_SIZE
    thickness = max(1, round(10 * size / REF_SIZE))
    (w, h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = round(0.03 * size)
    corners = [(x, y) for y in (margin + h, size - margin) for x in (margin, size - margin - w)]
    f = tissue_low.shape[0] / size

    def covered(corner: tuple[int, int]) -> float:
        x, y = corner
        return float(
            tissue_low[int((y - h) * f) : int(y * f) + 1, int(x * f) : int((x + w) * f) + 1].mean()
        )

    corner = min((corners[i] for i in rng.permutation(4)), key=covered)
    brightness = int(rng.integers(225, 256))
    cv2.putText(
        image, letter, corner, cv2.FONT_HERSHEY_SIMPLEX, scale, brightness, thickness, cv2.LINE_AA
    )
