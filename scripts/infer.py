"""Make a submission CSV from one checkpoint or an ensemble.

python scripts/infer.py --ensemble                    # every model of infer.ensemble
python scripts/infer.py --checkpoints runs/a/fold0/best.pt runs/b/fold0/best.pt
python scripts/infer.py --config configs/x.yaml --ensemble infer.tta=[none,hflip]
python scripts/infer.py --ensemble --out submissions/final.csv --labels DIR
"""

from __future__ import annotations

import argparse
import sys

from bonecomp.config import ConfigError, load_config
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import DataLayoutError, discover
from bonecomp.inference.predict import find_checkpoints, predict_submission
from bonecomp.submission import SubmissionError, score_submission


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="recipe YAML")
    ap.add_argument("--ensemble", action="store_true", help="all models of the ensemble section")
    ap.add_argument("--checkpoints", nargs="+", default=(), help="checkpoint files to use")
    ap.add_argument("--out", help="CSV path (default submissions/<name>_<timestamp>.csv)")
    ap.add_argument("--data", help="data root (default data.root of the config)")
    ap.add_argument("--labels", help="also score against these ground-truth JSONs")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. infer.tta=[none]")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        checkpoints = find_checkpoints(cfg, args.ensemble, args.checkpoints)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(checkpoints)} model(s): " + ", ".join(str(p) for p, _ in checkpoints))
    try:
        res = predict_submission(cfg, checkpoints, args.out, args.data, not args.quiet)
    except DataLayoutError as e:
        print(f"no test data: {e}", file=sys.stderr)
        return 2
    except SubmissionError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"thresholds: {res.thresholds_from}")
    print(res.report.summary())
    print(
        f"wrote {res.path}: {res.rows} rows, {res.images} images, "
        f"{res.seconds_per_image:.3f} s per image"
    )
    if args.labels:
        shapes = png_shapes(discover(args.data or cfg.data.root, "test"))
        table, _ = score_submission(res.path, args.labels, shapes, progress=not args.quiet)
        print(table.format_compact())
    return 0


if __name__ == "__main__":
    sys.exit(main())
