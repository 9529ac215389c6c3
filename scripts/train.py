"""Train one fold (or all folds) of a recipe.

python scripts/train.py --fold 0                     # the competition recipe (configs/default.yaml)
python scripts/train.py --config configs/demo.yaml --fold 0       # the phantom demo
python scripts/train.py --fold all model.arch=unet train.epochs=50
python scripts/train.py --fold 0 --resume            # after a crash
torchrun --nproc_per_node=4 scripts/train.py --fold 0   # one machine, 4 GPUs
torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=HOST0 --master_port=29500
    scripts/train.py --fold 0   # node 0; the same with --node_rank=1 on node 1 (docs/pipeline.md)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bonecomp import cli, distributed
from bonecomp.config import Config
from bonecomp.report import write_run_report
from bonecomp.runs import experiment_dir
from bonecomp.training import run_training
from bonecomp.viz import plot_dice_bars


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--fold", required=True, help="fold index, or 'all'")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    args = cli.parse(ap, argv)
    return cli.run(lambda: train(args))


def train(args) -> int:
    cfg = cli.load(args, training=True)
    try:
        folds = cli.folds(args.fold, cfg)
        for fold in folds:
            result = run_training(
                cfg, fold, args.resume, not args.quiet, lambda run: plot_dice_bars(run.dice_csv),
                on_end=lambda run, last=fold == folds[-1]: report(cfg, last),
            )  # fmt: skip
            cut = f" ({result.cut})" if result.cut else ""
            print(
                f"fold {fold}: best val Dice {result.best_dice:.4f} at epoch "
                f"{result.best_epoch}{cut} -> {result.run_dir}"
            )
            warning = result.warning(fold, cfg.train.expect_dice)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
    finally:
        distributed.shutdown()
    return 0


def report(cfg: Config, last_fold: bool) -> Path | None:
    """Refresh runs/<experiment>/report.html with every trained fold (train.report; rank 0),
    called by run_training at the end of a fold so the trackers get the page."""
    dd = distributed.setup(cfg.train.device, cfg.train.dist_timeout)  # the job it joined
    # under torchrun the other ranks would wait for rank 0's page: last fold only
    if not cfg.train.report or not dd.main or not (last_fold or dd.world == 1):
        return None
    start = time.perf_counter()
    try:
        path = write_run_report(experiment_dir(cfg))
    except Exception as e:  # the fold is trained and saved: a failed page must not undo that
        print(f"warning: report not written ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    print(f"report {path} ({time.perf_counter() - start:.1f} s)")
    return path


if __name__ == "__main__":
    sys.exit(main())
