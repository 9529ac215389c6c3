"""Train one fold (or all folds) of a recipe.

python scripts/train.py --fold 0                                  # configs/demo.yaml
python scripts/train.py --config configs/unetpp_effb4_1024.yaml --fold all
python scripts/train.py --fold 0 model.arch=unetplusplus train.epochs=50
python scripts/train.py --fold 0 --resume                         # after a crash
torchrun --nproc_per_node=4 scripts/train.py --config ... --fold 0
"""

from __future__ import annotations

import argparse
import sys

from bonecomp.config import ConfigError, load_config
from bonecomp.data.layout import DataLayoutError
from bonecomp.training import run_training, shutdown_distributed
from bonecomp.viz import plot_dice_bars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="recipe YAML")
    ap.add_argument("--fold", required=True, help="fold index, or 'all'")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=50")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    folds = range(cfg.data.n_splits) if args.fold == "all" else [int(args.fold)]
    on_best = lambda run_dir: plot_dice_bars(run_dir / "dice_per_class.csv")  # noqa: E731
    try:
        for fold in folds:
            result = run_training(cfg, fold, args.resume, not args.quiet, on_best)
            print(
                f"fold {fold}: best val Dice {result.best_dice:.4f} at epoch "
                f"{result.best_epoch} -> {result.run_dir / 'best.pt'}"
            )
    except DataLayoutError as e:
        print(f"no training data: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
