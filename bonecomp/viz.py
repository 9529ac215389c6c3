"""Pictures for people: per-class Dice charts and prediction overlays.

A leaf module: it may import anything, nothing in the core imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from bonecomp import rle
from bonecomp.classes import CLASSES, NUM_CLASSES
from bonecomp.data.annotations import Polygons, load_annotation
from bonecomp.data.images import png_shapes, read_image
from bonecomp.data.layout import discover, image_path
from bonecomp.data.rasterize import rasterize, truth_crops
from bonecomp.data.truth import GroundTruth
from bonecomp.inference.oof import RunOOF, open_oof
from bonecomp.inference.postprocess import upsample_threshold
from bonecomp.inference.thresholds import image_dice
from bonecomp.metrics import summarize
from bonecomp.runs import DICE_CSV, RunDir
from bonecomp.submission import label_index, read_submission, score_submission


def plot_dice_bars(
    csv_path: Path | str, png_path: Path | str | None = None, title: str = ""
) -> Path:
    """Bar chart of a per-class Dice CSV (columns class, dice [, more columns])."""
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_suffix(".png")
    df = pd.read_csv(csv_path)
    cols = [c for c in df.columns if c != "class"]
    fig = Figure(figsize=(12, 4.5))
    ax = fig.add_subplot()
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
    dim: float = 1.0,
) -> np.ndarray:
    """BGR picture of a grey image with class outlines: prediction in the class colour
    (labelled), truth thin white, so misses and spills stand out.

    ``pred``/``truth`` are (C, H, W) masks at the image's size (or at the picture's);
    ``classes`` limits the classes drawn; ``scale`` resizes the picture (2048 px is
    large); ``dim`` < 1 darkens the image so white truth outlines show on bright bone.
    """
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if dim != 1.0:
        small = cv2.convertScaleAbs(small, alpha=dim)
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


def submission_overlays(
    csv: Path | str,
    data_root: Path | str,
    out: Path,
    labels_dir: Path | str | None = None,
    images: list[str] | None = None,
    n: int = 4,
    scale: float = 0.5,
) -> list[Path]:
    """Overlays of a submission's masks (and truth, with labels: then the worst images
    first, and a per-class Dice chart)."""
    test = discover(data_root, "test")
    shapes = png_shapes(test)
    paths = dict(zip(test["name"], test["image_path"], strict=True))
    sub = read_submission(csv)
    names = list(dict.fromkeys(sub["image_name"]))
    labels = label_index(labels_dir) if labels_dir else {}
    written = []
    if labels_dir:
        table, dice = score_submission(csv, labels_dir, shapes, progress=False)
        table.to_frame().to_csv(out / DICE_CSV, index=False)
        title = f"{csv}: mean Dice {table.mean:.4f}"
        written.append(plot_dice_bars(out / DICE_CSV, title=title))
        names = [names[i] for i in np.argsort(dice.mean(axis=1))]
    for name in images or names[:n]:
        image = read_image(paths[name])
        codes = sub.loc[sub["image_name"] == name, "rle"]
        pred = np.stack([rle.decode(code, image.shape) for code in codes])
        truth = rasterize(load_annotation(labels[name]), image.shape) if name in labels else None
        written.append(
            _save(out / f"{Path(name).stem}_overlay.png", overlay(image, pred, truth, scale=scale))
        )
    return written


@dataclass(frozen=True)
class OofImage:
    """One validation image of a fold and its saved out-of-fold probabilities (read from
    the memory-mapped ``oof.npy`` when asked, so a fold of any size costs no memory)."""

    name: str
    rel: str
    image_path: Path
    hw: tuple[int, int]
    polygons: Polygons
    oof: RunOOF  # the fold's OOF maps (memory-mapped)
    row: int
    box: tuple[int, int, int, int] | None = None  # a crop experiment's box: image cut to it

    @property
    def probs(self) -> torch.Tensor:
        return self.oof.probs(self.row)

    def dice(self, thresholds: float | Sequence[float] = 0.5) -> np.ndarray:
        """Competition Dice per class at the original size (exact truth, no dense mask)."""
        truth = truth_crops(self.polygons, self.hw)
        return image_dice(self.probs, truth, self.hw, [thresholds])[:, 0]

    def picture(
        self,
        classes: list[int] | None = None,
        scale: float = 0.25,
        thresholds: float | Sequence[float] = 0.5,
        dim: float = 1.0,
    ) -> np.ndarray:
        """``overlay`` of this image, prediction and truth drawn directly at ``scale``
        (no full-size mask: a 2048 px image costs milliseconds)."""
        image = read_image(self.image_path)
        if self.box is not None:  # hw and polygons are in the box's frame already
            image = image[self.box[0] : self.box[1], self.box[2] : self.box[3]]
        small = (round(image.shape[0] * scale), round(image.shape[1] * scale))
        pred = upsample_threshold(self.probs, small, thresholds, logits=False).dense().numpy()
        truth = rasterize(self.polygons, image.shape[:2], small)
        return overlay(image, pred, truth, classes, scale, dim)


def oof_images(
    run: Path | str | RunDir, images: list[str] | None = None, truth: GroundTruth | None = None
) -> list[OofImage]:
    """The validation images of a fold with saved OOF probabilities (``images``: only
    these file names), in the order of its ``oof_index.csv``. ``truth``: where the
    polygons come from (default: ``GroundTruth.of`` the run's saved data section)."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    oof = open_oof(run)
    data = run.saved_config().data
    truth = truth if truth is not None else GroundTruth.of(data)
    out = []
    for r in oof.rows:
        if images and r.name not in images:
            continue
        polys = truth.polygons(r.rel, r.box)  # a crop experiment: in its box's frame
        path = image_path(data.root, r.rel)
        out.append(OofImage(r.name, r.rel, path, r.hw, polys, oof, r.row, r.box))
    return out


def run_overlays(
    run: Path | str, out: Path, images: list[str] | None = None, n: int = 4, scale: float = 0.5
) -> list[Path]:
    """Overlays of a validation fold from its saved out-of-fold probabilities (threshold
    0.5), worst images first, plus the run's per-class Dice chart. Prints per image."""
    run = RunDir(Path(run))
    written = [plot_dice_bars(run.dice_csv, out / run.dice_png.name)]
    rows = sorted(((im.dice(), im) for im in oof_images(run, images)), key=lambda t: t[0].mean())
    for d, im in rows if images else rows[:n]:
        worst = ", ".join(f"{CLASSES[c]} {d[c]:.3f}" for c in np.argsort(d)[:3])
        print(f"{im.rel}: mean Dice {d.mean():.4f}; worst {worst}")
        written.append(_save(out / f"{Path(im.name).stem}_overlay.png", im.picture(scale=scale)))
    if rows:
        table = summarize(np.stack([t[0] for t in rows]))
        print(f"fold mean Dice (OOF, threshold 0.5) {table.mean:.4f} over {len(rows)} images")
    return written


def _save(path: Path, picture: np.ndarray) -> Path:
    cv2.imwrite(str(path), picture)
    return path
