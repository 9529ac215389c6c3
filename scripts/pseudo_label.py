"""Write pseudo-labels of the test images from a finished ensemble, for retraining.

    python scripts/pseudo_label.py                      # the members of infer.ensemble
    python scripts/pseudo_label.py --config configs/demo.yaml --out runs/pseudo_demo
    python scripts/pseudo_label.py --checkpoints runs/a/fold0/best.pt data.image_size=1024

The members, TTA, class weights and thresholds are those scripts/infer.py uses. Writes
the test images at data.image_size with the ensemble's probabilities into
runs/pseudo_<infer.name>/ (or --out); train with train.pseudo_labels=<that folder>.
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.inference.pseudo_labels import write_pseudo_labels


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    cli.add_members(ap)
    ap.add_argument("--out", help="folder (default runs/pseudo_<infer.name>)")
    ap.add_argument("--data", help="data root (default data.root of the config)")
    args = cli.parse(ap, argv)
    return cli.run(lambda: pseudo(args))


def pseudo(args) -> int:
    cfg = cli.load(args)
    members = cli.members(args, cfg)
    print(f"{len(members)} model(s): " + ", ".join(str(m.checkpoint) for m in members))
    res = write_pseudo_labels(cfg, members, args.out, args.data, not args.quiet)
    print(f"thresholds: {res.thresholds_from}")
    print(f"ensemble weights: {res.weights_from}")
    per_image = f"{res.seconds_per_image:.3f} s/image"
    print(f"wrote {res.path}: {res.images} images at {res.size} px, {per_image}")
    print(f"retrain with: train.pseudo_labels={res.path} train.experiment=<a new name>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
