"""Pictures for people: per-class Dice charts and prediction overlays.

A leaf module: it may import anything, nothing in the core imports it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bonecomp.classes import CLASSES, NUM_CLASSES


def plot_dice_bars(
    csv_path: Path | str, png_path: Path | str | None = None, title: str = ""
) -> Path:
    """Bar chart of a per-class Dice CSV (columns class, dice [, more columns])."""
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_suffix(".png")
    df = pd.read_csv(csv_path)
    cols = [c for c in df.columns if c != "class"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(cols)
    x = np.arange(len(df))
    for i, col in enumerate(cols):
        ax.bar(
            x + (i - (len(cols) - 1) / 2) * width,
            df[col],
            width,
            label=f"{col} (mean {df[col].mean():.4f})",
        )
    ax.set_xticks(x, df["class"], rotation=70, fontsize=8)
    lo = max(0.0, float(df[cols].min().min()) - 0.05)
    ax.set_ylim(lo, 1.0)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or csv_path.parent.as_posix())
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def class_colors() -> np.ndarray:
    """A distinct BGR colour per class (for cv2 drawing)."""
    hsv = np.zeros((NUM_CLASSES, 1, 3), np.uint8)
    golden = 0.618033988749895  # neighbouring classes get far-apart hues
    hsv[:, 0, 0] = (np.arange(NUM_CLASSES) * golden % 1.0 * 180).astype(np.uint8)
    hsv[:, 0, 1:] = 255
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[:, 0]


def overlay(
    image: np.ndarray,
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    classes: list[int] | None = None,
    scale: float = 0.5,
) -> np.ndarray:
    """BGR picture of a grey image with class outlines: prediction in the class colour
    (labelled), truth thin white, so misses and spills stand out.

    ``pred``/``truth`` are (C, H, W) masks at the image's size; ``classes`` limits the
    classes drawn; ``scale`` resizes the picture (2048 px is large).
    """
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    canvas = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    colors = class_colors()
    for c in classes if classes is not None else range(NUM_CLASSES):
        color = tuple(int(v) for v in colors[c])
        if truth is not None:
            cv2.drawContours(canvas, _contours(truth[c], size), -1, (255, 255, 255), 1)
        if pred is None:
            continue
        m = cv2.resize(pred[c].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        cv2.drawContours(canvas, _contours(m, size), -1, color, 1 if truth is not None else 2)
        moments = cv2.moments(m, binaryImage=True)
        if moments["m00"] > 0:
            x, y = int(moments["m10"] / moments["m00"]), int(moments["m01"] / moments["m00"])
            label = CLASSES[c].replace("finger-", "f")
            cv2.putText(
                canvas, label, (x - 8, y + 3), cv2.FONT_HERSHEY_SIMPLEX, 0.3, color, 1, cv2.LINE_AA
            )
    return canvas


def _contours(mask: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    m = mask.astype(np.uint8)
    if m.shape[::-1] != size:
        m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return contours
