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

from bonecomp.viz import run_overlays, submission_overlays


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
    if args.csv and not args.data:
        ap.error("--csv needs --data (the data root with test/DCM)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.csv:
        written = submission_overlays(
            args.csv, args.data, out, args.labels, args.images, args.n, args.scale
        )
    else:
        written = run_overlays(args.run, out, args.images, args.n, args.scale)
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
