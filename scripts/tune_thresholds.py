"""Tune one threshold per class on the out-of-fold probabilities saved by training.

    python scripts/tune_thresholds.py                  # the members of infer.ensemble
    python scripts/tune_thresholds.py --config configs/demo.yaml
    python scripts/tune_thresholds.py --checkpoints runs/a/fold0/best.pt --out thr.json

The members are resolved exactly as scripts/infer.py resolves them. Writes
runs/thresholds_<infer.name>.json (which infer.py picks up) and prints the per-class OOF
Dice before (0.5) and after. Re-tuning an existing file keeps its still-valid parts and
says in one line what it kept or dropped (a clean-up tuned at other thresholds).
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.inference.thresholds import DEFAULT, GRID, tune_thresholds


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    cli.add_members(ap)
    ap.add_argument("--out", help="thresholds file (default runs/thresholds_<infer.name>.json)")
    ap.add_argument("--grid", nargs="+", type=float, default=GRID, help="candidate thresholds")
    ap.add_argument("--min-gain", type=float, default=1e-3, help="keep 0.5 unless beaten by this")
    args = cli.parse(ap, argv)
    return cli.run(lambda: tune(args))


def tune(args) -> int:
    cli.check_out_file(args.out)  # the options, before any OOF map is read
    cli.check_grid(args.grid, must_hold=DEFAULT)
    cli.check_min_gain(args.min_gain)
    cfg = cli.load(args)
    members = cli.members(args, cfg)
    print(f"tuning on {len(members)} fold(s): " + ", ".join(str(m.run) for m in members))
    res, path = tune_thresholds(cfg, members, args.grid, args.min_gain, args.out, not args.quiet)
    print(res.before.format(res.after, labels=("at 0.5", "tuned")))
    print("thresholds: " + " ".join(f"{t:.2f}" for t in res.thresholds))
    print(f"OOF mean Dice {res.before.mean:.4f} -> {res.after.mean:.4f}; wrote {path}")
    if res.file_note:  # what re-tuning kept or dropped of the file it rewrote
        print(res.file_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
