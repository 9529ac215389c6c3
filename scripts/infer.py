"""Make a submission CSV from one model or an ensemble.

python scripts/infer.py --ensemble                   # infer.ensemble of configs/default.yaml
python scripts/infer.py --config configs/demo.yaml --ensemble infer.tta=[none,hflip]
python scripts/infer.py --checkpoints runs/a/fold0/best.pt runs/b/fold0/best.pt
python scripts/infer.py --ensemble --out submissions/final.csv --labels DIR
python scripts/infer.py --config configs/carpal_crop_1024.yaml --ensemble   # + carpal crop
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.inference.predict import predict_submission
from bonecomp.runs import ensemble_members
from bonecomp.submission import score_submission


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--ensemble", action="store_true", help="all models of infer.ensemble")
    ap.add_argument("--checkpoints", nargs="+", default=(), help="checkpoint files to use")
    ap.add_argument("--out", help="CSV path (default submissions/<name>_<timestamp>.csv)")
    ap.add_argument("--data", help="data root (default data.root of the config)")
    ap.add_argument("--labels", help="also score against these ground-truth JSONs")
    args = cli.parse(ap, argv)
    return cli.run(lambda: infer(args))


def infer(args) -> int:
    cfg = cli.load(args)
    members = ensemble_members(cfg, args.ensemble, args.checkpoints)
    print(f"{len(members)} model(s): " + ", ".join(str(m.checkpoint) for m in members))
    res = predict_submission(cfg, members, args.out, args.data, not args.quiet)
    print(f"TTA views: {', '.join(res.views)}")
    print(f"thresholds: {res.thresholds_from}")
    print(f"ensemble weights: {res.weights_from}")
    print(f"clean-up: {res.cleanup_from}")
    if res.crop_boxes is not None:
        found = sum(b is not None for b in res.crop_boxes.values())
        print(
            f"carpal crop ({cfg.infer.crop.experiment}): {found}/{res.images} images re-predicted"
        )
    for warning in res.report.warnings:
        print(f"warning: {warning}")
    print(res.report.summary())
    per_image = f"{res.seconds_per_image:.3f} s/image"
    print(f"wrote {res.path}: {res.rows} rows, {res.images} images, {per_image}")
    if args.labels:
        shapes = png_shapes(discover(args.data or cfg.data.root, "test"))
        table, _ = score_submission(res.path, args.labels, shapes, progress=not args.quiet)
        print(table.format_compact())
    return 0


if __name__ == "__main__":
    sys.exit(main())
