"""Overlay pictures (prediction and truth outlines per class) and a per-class Dice chart.

    python scripts/visualize.py --csv submissions/demo.csv --data data/phantom \\
        --labels data/phantom/test_labels --out viz/            # a submission
    python scripts/visualize.py --run runs/demo/fold0 --out viz/   # a validation fold (OOF)

Without --images, the images with the lowest mean Dice are drawn first (where it fails).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from bonecomp import rle
from bonecomp.classes import CLASSES
from bonecomp.config import load_config
from bonecomp.data.annotations import load_annotation
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.data.rasterize import rasterize, truth_crops
from bonecomp.inference.postprocess import overlap_counts, upsample_threshold
from bonecomp.metrics import dice_from_counts, summarize
from bonecomp.submission import label_index, read_submission, score_submission
from bonecomp.viz import overlay, plot_dice_bars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="submission CSV to draw")
    src.add_argument("--run", help="run folder (runs/<experiment>/fold<k>) to draw its OOF")
    ap.add_argument("--data", help="data root (CSV mode; run mode reads the run's config)")
    ap.add_argument("--labels", help="ground-truth JSON folder (CSV mode)")
    ap.add_argument("--images", nargs="+", help="image file names to draw")
    ap.add_argument("--n", type=int, default=4, help="how many images when --images is not given")
    ap.add_argument("--out", default="viz", help="output folder")
    ap.add_argument("--scale", type=float, default=0.5, help="picture scale (1 = full size)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = draw_submission(args, out) if args.csv else draw_run(args, out)
    for p in written:
        print(p)
    return 0


def draw_submission(args, out: Path) -> list[Path]:
    if not args.data:
        sys.exit("--csv needs --data (the data root with test/DCM)")
    test = discover(args.data, "test").set_index("name")
    sub = read_submission(args.csv)
    names = list(dict.fromkeys(sub["image_name"]))
    written = []
    order = names
    labels = label_index(args.labels) if args.labels else {}
    if args.labels:
        table, dice = score_submission(args.csv, args.labels, progress=False)
        csv = out / "dice_per_class.csv"
        table.to_frame().to_csv(csv, index=False)
        written.append(plot_dice_bars(csv, title=f"{args.csv}: mean Dice {table.mean:.4f}"))
        order = [names[i] for i in np.argsort(dice.mean(axis=1))]
    for name in args.images or order[: args.n]:
        image = read_image(test.loc[name, "image_path"])
        codes = sub.loc[sub["image_name"] == name, "rle"].tolist()
        pred = np.stack([rle.decode(code, image.shape) for code in codes])
        truth = rasterize(load_annotation(labels[name]), image.shape) if name in labels else None
        written.append(
            _save(
                out / f"{Path(name).stem}_overlay.png",
                overlay(image, pred, truth, scale=args.scale),
            )
        )
    return written


def draw_run(args, out: Path) -> list[Path]:
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    index = pd.read_csv(run / "oof_index.csv", dtype={"rel": str})
    oof = np.load(run / "oof.npy", mmap_mode="r")
    written = [plot_dice_bars(run / "dice_per_class.csv", out / "dice_per_class.png")]
    jdir = Path(cfg.data.root) / "train" / "outputs_json"
    dcm = Path(cfg.data.root) / "train" / "DCM"
    rows = []
    for r in index.itertuples():
        if args.images and r.name not in args.images:
            continue
        hw = (int(r.src_h), int(r.src_w))
        masks = upsample_threshold(
            torch.from_numpy(oof[r.row].astype(np.float32)), hw, 0.5, logits=False
        )
        polys = load_annotation(jdir / Path(r.rel).with_suffix(".json"))
        d = dice_from_counts(*overlap_counts(masks.masks, truth_crops(polys, hw)))
        rows.append((d.mean(), r, masks, polys, d))
    rows.sort(key=lambda t: t[0])
    chosen = rows if args.images else rows[: args.n]
    for mean, r, masks, polys, d in chosen:
        image = read_image(dcm / r.rel)
        pred = masks.dense().numpy()
        truth = rasterize(polys, image.shape)
        worst = ", ".join(f"{CLASSES[c]} {d[c]:.3f}" for c in np.argsort(d)[:3])
        print(f"{r.rel}: mean Dice {mean:.4f}; worst {worst}")
        written.append(
            _save(
                out / f"{Path(r.name).stem}_overlay.png",
                overlay(image, pred, truth, scale=args.scale),
            )
        )
    if rows:
        summary = summarize(np.stack([t[4] for t in rows]))
        print(f"fold mean Dice (OOF, threshold 0.5) {summary.mean:.4f} over {len(rows)} images")
    return written


def _save(path: Path, picture: np.ndarray) -> Path:
    cv2.imwrite(str(path), picture)
    return path


if __name__ == "__main__":
    sys.exit(main())
