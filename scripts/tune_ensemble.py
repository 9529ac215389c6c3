"""Tune class-wise ensemble weights (per experiment) and per-class thresholds on the
out-of-fold probabilities saved by training.

    python scripts/tune_ensemble.py                       # the experiments of infer.ensemble
    python scripts/tune_ensemble.py --step 0.25 --min-share 0.25
    python scripts/tune_ensemble.py --config configs/demo.yaml --out thr.json

The members are resolved exactly as scripts/infer.py resolves them. Writes
runs/thresholds_<infer.name>.json with a class_weights table (which infer.py applies)
and prints the per-class OOF Dice before (configured weights, 0.5), with tuned
thresholds only, and with tuned weights and thresholds. Re-tuning an existing file keeps
its clean-up only at the same thresholds, weights and models, and says in one line what
it kept or dropped.
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.inference.class_weights import MIN_GAIN, MIN_SHARE, STEP, tune_ensemble
from bonecomp.inference.thresholds import DEFAULT, GRID


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    cli.add_members(ap)
    ap.add_argument("--out", help="thresholds file (default runs/thresholds_<infer.name>.json)")
    ap.add_argument("--grid", nargs="+", type=float, default=GRID, help="candidate thresholds")
    ap.add_argument("--step", type=float, default=STEP, help="weight grid step (0.1, 0.25)")
    ap.add_argument(
        "--min-share", type=float, default=MIN_SHARE, help="least weight per experiment"
    )
    ap.add_argument(
        "--min-gain", type=float, default=MIN_GAIN, help="keep defaults unless beaten by this"
    )
    args = cli.parse(ap, argv)
    return cli.run(lambda: tune(args))


def tune(args) -> int:
    cli.check_out_file(args.out)  # the options, before any OOF map is read
    cli.check_grid(args.grid, must_hold=DEFAULT)
    cli.check_min_gain(args.min_gain)
    cfg = cli.load(args)
    members = cli.members(args, cfg)
    print(f"tuning on {len(members)} fold(s): " + ", ".join(str(m.run) for m in members))
    try:
        res, path = tune_ensemble(
            cfg, members, args.grid, args.step, args.min_share, args.min_gain, args.out,
            not args.quiet,
        )  # fmt: skip
    except ValueError as e:  # --step, --min-share or --grid out of range; no OOF images
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res.format())
    print(
        f"OOF mean Dice {res.before.mean:.4f} (before) -> {res.thresholds_only.mean:.4f} "
        f"(thresholds) -> {res.after.mean:.4f} (weights + thresholds); "
        f"{len(res.candidates)} weightings x {len(res.grid)} thresholds on "
        f"{res.after.n_images} images in {res.seconds:.1f} s; wrote {path}"
    )
    if res.file_note:  # what re-tuning kept or dropped of the file it rewrote
        print(res.file_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
