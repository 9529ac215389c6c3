"""What lies on the film but is no bone: rings, wrist objects and burnt-in text.

Teams excluded real images for such foreign objects, so the phantom carries them on some
images (seeded per hand, independent of the pose). They are never labelled: metal covers
the bones beneath it in the image while the bone polygons stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from bonecomp.data.phantom.anatomy import DIGIT_CLASSES, REF_SIZE, TISSUE_PAD, Anatomy

RING_CHANCE = 0.06  # per hand: a ring on a finger's proximal phalanx
WRIST_CHANCE = 0.05  # per hand: a watch or a bracelet round the distal forearm
TEXT_CHANCE = 0.3  # per hand: burnt-in text besides the side marker
WRIST_KINDS = ("watch", "bracelet")
_WORDS = ("PA", "AP", "HAND", "WRIST", "STD", "PORT", "x0.9", "RT", "LT", "DX", "2022", "KUB")
_RING_DIGITS = (3, 3, 3, 2, 1, 4)  # digit index (DIGIT_CLASSES): the ring finger above all


@dataclass(frozen=True)
class Artefacts:
    """The foreign objects of one image; all empty for most images."""

    ring: int | None = None  # digit (DIGIT_CLASSES index) wearing a ring
    ring_at: float = 0.5  # position along the proximal phalanx (0 base, 1 head)
    wrist: str | None = None  # "watch" or "bracelet"
    wrist_at: float = 30.0  # mm proximal of the forearm bones' distal ends
    texts: tuple[str, ...] = ()  # burnt-in labels besides the side marker

    def kinds(self) -> list[str]:
        """Names of the artefacts present: "ring", "watch", "bracelet", "text"."""
        return [
            *(["ring"] if self.ring is not None else []),
            *([self.wrist] if self.wrist else []),
            *(["text"] if self.texts else []),
        ]


def sample_artefacts(rng: np.random.Generator) -> Artefacts:
    """Which foreign objects one image carries; each kind is drawn independently."""
    ring = int(rng.choice(_RING_DIGITS)) if rng.random() < RING_CHANCE else None
    ring_at = float(rng.uniform(0.3, 0.6))
    wrist = str(rng.choice(WRIST_KINDS)) if rng.random() < WRIST_CHANCE else None
    wrist_at = float(rng.uniform(18.0, 38.0))  # further off, it may leave the film
    texts: tuple[str, ...] = ()
    if rng.random() < TEXT_CHANCE:
        words = [str(w) for w in rng.choice(_WORDS, int(rng.integers(1, 3)), replace=False)]
        texts = tuple(
            f"{w} {int(rng.integers(1, 100))}" if rng.random() < 0.3 else w for w in words
        )
    return Artefacts(ring, ring_at, wrist, wrist_at, texts)


def metal_shapes(
    artefacts: Artefacts,
    anatomy: Anatomy,
    strokes: list[tuple[np.ndarray, np.ndarray, float]],
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, float]]:
    """Outlines (mm, skeleton frame) of the metal on the film and how much each attenuates.

    A ring is a band across the finger's soft tissue over the proximal phalanx; a watch is a
    case on the forearm with a fainter strap, a bracelet a chain of beads; both cross the
    forearm from skin to skin ``wrist_at`` mm above the wrist.
    """
    shapes: list[tuple[np.ndarray, float]] = []
    if artefacts.ring is not None:
        index = sum(len(d) for d in DIGIT_CLASSES[: artefacts.ring]) + 1  # proximal phalanx
        start, end, thickness = strokes[index]
        centre = start + (end - start) * artefacts.ring_at
        along = (end - start) / np.linalg.norm(end - start)
        band = rng.uniform(2.0, 4.5)
        shapes.append((_box(centre, along, band, thickness + 2.0), rng.uniform(170, 230)))
    if artefacts.wrist is not None:
        shapes += _wrist_object(artefacts, anatomy, rng)
    return shapes


def _wrist_object(
    artefacts: Artefacts, anatomy: Anatomy, rng: np.random.Generator
) -> list[tuple[np.ndarray, float]]:
    """A watch (case and strap) or a bracelet (beads) across the distal forearm."""
    tops = anatomy.forearm[:, :2]
    level = tops[:, 1].min() - artefacts.wrist_at
    # forearm bones run from (bottom_x, far below) to their distal tops; find them at ``level``
    bottoms = np.column_stack([anatomy.forearm[:, 2], tops[:, 1] - 320.0])
    fraction = (level - bottoms[:, 1]) / (tops[:, 1] - bottoms[:, 1])
    axes = bottoms + (tops - bottoms) * fraction[:, None]  # radius, ulna centre lines
    across = (axes[1] - axes[0]) / np.linalg.norm(axes[1] - axes[0])
    along = np.array([-across[1], across[0]])
    pad = TISSUE_PAD["forearm"] * anatomy.tissue
    a = axes[0] - across * (anatomy.forearm[0, 4] / 2 + pad)
    b = axes[1] + across * (anatomy.forearm[1, 4] / 2 + pad)
    centre, width = (a + b) / 2, float(np.linalg.norm(b - a))
    if artefacts.wrist == "watch":
        strap = (_box(centre, along, rng.uniform(16, 22), width), rng.uniform(15, 35))
        case = _box(centre, along, rng.uniform(34, 42), rng.uniform(32, 40), rounded=True)
        return [strap, (case, rng.uniform(150, 210))]
    beads = []
    step = rng.uniform(5.0, 7.0)
    brightness = rng.uniform(140, 200)
    for t in np.arange(step / 2, width, step):
        beads.append((_circle(a + across * t, step * 0.45), brightness))
    return beads


def _box(
    centre: np.ndarray, along: np.ndarray, height: float, width: float, rounded: bool = False
) -> np.ndarray:
    """A rectangle (``height`` along ``along``, ``width`` across), optionally with round
    corners, as a closed outline."""
    across = np.array([along[1], -along[0]])
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    p = 4.0 if rounded else 12.0  # super-ellipse: rounded corners or nearly sharp ones
    c, s = np.cos(theta), np.sin(theta)
    u = np.sign(c) * np.abs(c) ** (2 / p) * width / 2
    v = np.sign(s) * np.abs(s) ** (2 / p) * height / 2
    return centre + u[:, None] * across + v[:, None] * along


def _circle(centre: np.ndarray, radius: float) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return centre + radius * np.column_stack([np.cos(theta), np.sin(theta)])


def draw_metal(layer: np.ndarray, shapes: Sequence[tuple[np.ndarray, float]]) -> None:
    """Add the metal (pixel outlines and attenuation) to the float image ``layer``, in place."""
    size = layer.shape[0]
    for poly, level in shapes:
        pts = np.rint(poly).astype(np.int32)
        lo = np.clip(pts.min(0) - 2, 0, size)
        hi = np.clip(pts.max(0) + 3, 0, size)
        if np.any(hi <= lo):
            continue
        mask = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
        cv2.fillPoly(mask, [pts], 1, offset=(-int(lo[0]), -int(lo[1])))
        soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(0.5, size / REF_SIZE))
        layer[lo[1] : hi[1], lo[0] : hi[0]] += level * soft


def draw_texts(
    image: np.ndarray, texts: tuple[str, ...], tissue_low: np.ndarray, rng: np.random.Generator
) -> None:
    """Burn text labels into the uint8 image along the top and bottom edges, where the film
    is clearest of tissue and of other labels; some sit in a box, as printed labels do."""
    size = image.shape[0]
    f = tissue_low.shape[0] / size
    scale = 2.2 * size / REF_SIZE * rng.uniform(0.8, 1.2)
    thickness = max(1, round(5 * size / REF_SIZE))
    margin = round(0.03 * size)
    for text in texts:
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        xs = np.linspace(margin, max(margin, size - margin - w), 5).astype(int)
        spots = [(int(x), y) for y in (margin + h + round(0.08 * size), size - margin) for x in xs]

        def covered(spot: tuple[int, int], w: int = w, h: int = h) -> float:
            x, y = spot
            window = tissue_low[
                int((y - h) * f) : int(y * f) + 1, int(x * f) : int((x + w) * f) + 1
            ]
            taken = image[max(0, y - 2 * h) : y + h, max(0, x - h) : x + w + h] > 200
            return float(window.mean()) + float(taken.any())  # never over the marker or text

        x, y = min((spots[i] for i in rng.permutation(len(spots))), key=covered)
        brightness = int(rng.integers(200, 256))
        cv2.putText(
            image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, brightness, thickness, cv2.LINE_AA
        )
        if rng.random() < 0.4:
            pad = thickness * 2
            cv2.rectangle(image, (x - pad, y - h - pad), (x + w + pad, y + pad), brightness, 1)
