"""Tune one threshold per class on the out-of-fold probabilities saved by training.

    python scripts/tune_thresholds.py                          # the config's ensemble
    python scripts/tune_thresholds.py --experiments demo other --out thr.json

Writes runs/thresholds_<infer.name>.json (which scripts/infer.py picks up by default)
and prints the per-class OOF Dice before (0.5) and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonecomp.config import ConfigError, load_config
from bonecomp.inference.thresholds import (
    GRID,
    choose,
    default_thresholds_path,
    grid_dice,
    oof_items,
    write_thresholds,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="recipe YAML")
    ap.add_argument("--experiments", nargs="+", help="experiments (default: the ensemble's)")
    ap.add_argument("--out", help="thresholds file (default runs/thresholds_<infer.name>.json)")
    ap.add_argument("--grid", nargs="+", type=float, default=GRID, help="candidate thresholds")
    ap.add_argument("--min-gain", type=float, default=1e-3, help="keep 0.5 unless beaten by this")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    runs = Path(cfg.train.output_dir)
    if args.experiments:
        members = [(e, 1.0) for e in args.experiments]
    else:
        members = [(m.experiment, m.weight) for m in cfg.infer.ensemble] or [
            (cfg.train.experiment, 1.0)
        ]
    dirs, weights = [], []
    for exp, w in dict(members).items():
        found = sorted(d for d in (runs / exp).glob("fold*") if (d / "oof.npy").is_file())
        dirs += found
        weights += [w] * len(found)
    if not dirs:
        print(
            f"no out-of-fold predictions (oof.npy) under {runs} for {[e for e, _ in members]}; "
            "train with train.save_oof=true first",
            file=sys.stderr,
        )
        return 2
    print(f"tuning on {len(dirs)} fold(s): " + ", ".join(str(d) for d in dirs))
    dice, n = grid_dice(oof_items(dirs, cfg.data.root, weights, not args.quiet), args.grid)
    result = choose(dice, args.grid, args.min_gain)
    result.before.n_images = result.after.n_images = n
    print(result.before.format(result.after, labels=("at 0.5", "tuned")))
    print("thresholds: " + " ".join(f"{t:.2f}" for t in result.thresholds))
    out = Path(args.out) if args.out else default_thresholds_path(cfg)
    write_thresholds(
        out,
        result.thresholds,
        grid=list(args.grid),
        oof_images=n,
        dice_before=result.before.mean,
        dice_after=result.after.mean,
        runs=[str(d) for d in dirs],
    )
    print(
        f"OOF mean Dice {result.before.mean:.4f} -> {result.after.mean:.4f} over {n} images; "
        f"wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
