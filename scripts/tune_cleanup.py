"""Choose a per-class clean-up (largest component, small components removed, holes
filled) on the out-of-fold probabilities saved by training; keep a rule only where it
raises that class's OOF Dice.

    python scripts/tune_cleanup.py                     # after tune_thresholds / tune_ensemble
    python scripts/tune_cleanup.py --areas 100 500 2000 --rules largest fill_holes
    python scripts/tune_cleanup.py infer.cleanup_rules=[largest,open3]   # open3: your own
    python scripts/tune_cleanup.py --checkpoints runs/a/fold0/best.pt --out thr.json

The kinds of rule tried are --rules, else infer.cleanup_rules (null: every registered
one, a rule of a module under ``extensions`` too: docs/extending.md). The members are
resolved exactly as scripts/infer.py resolves them; the masks are
thresholded with the thresholds file in use (infer.thresholds, else
runs/thresholds_<infer.name>.json; without one, infer.threshold) and its class weights.
The chosen rules are added to that file (or a copy at --out) as its ``cleanup`` table,
which infer.py applies; prints per class the rules kept and the OOF Dice before/after.
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.inference.cleanup import AREAS, MIN_GAIN, candidates, tune_cleanup


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    cli.add_members(ap)
    ap.add_argument("--out", help="write here instead of the thresholds file in use")
    ap.add_argument("--rules", nargs="+", help="kinds of rule to try (infer.cleanup_rules)")
    ap.add_argument(
        "--areas", nargs="+", type=int, default=AREAS, help="min_area grid (source pixels)"
    )
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN, help="keep a rule if it gains more")
    args = cli.parse(ap, argv)
    return cli.run(lambda: tune(args))


def tune(args) -> int:
    cli.check_out_file(args.out)
    cli.check_min_gain(args.min_gain)
    cfg = cli.load(args)  # imports the recipe's extensions: their rules are known after it
    if args.rules is not None:
        candidates(args.areas, args.rules)  # a bad rule or area: one line, before any work
    members = cli.members(args, cfg)
    print(f"tuning on {len(members)} fold(s): " + ", ".join(str(m.run) for m in members))
    res, path = tune_cleanup(
        cfg, members, args.areas, args.rules, args.min_gain, args.out, not args.quiet
    )
    print(res.format())
    kept = res.cleanup.table
    print(f"clean-up kept for {len(kept)} class(es); OOF mean Dice "
          f"{res.before.mean:.4f} -> {res.after.mean:.4f}; wrote {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
