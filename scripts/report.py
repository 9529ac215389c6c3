"""One self-contained HTML page (images embedded, no network) for an experiment or an ensemble.

    python scripts/report.py runs/demo                        # all folds -> runs/demo/report.html
    python scripts/report.py --ensemble --config configs/demo.yaml \\
        --csv submissions/demo_X.csv --labels data/phantom/test_labels   # -> runs/report_demo.html

The page: learning curves per fold, the CV table and heat map (weakest classes first),
the worst validation images with prediction and truth outlines, the tuned thresholds'
effect, a submission's check and score, each run's config and the environment.
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.report import write_ensemble_report, write_run_report


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--ensemble", action="store_true", help="the config's infer.ensemble")
    cli.add_members(ap)
    ap.add_argument("--csv", help="submission CSV to check (ensemble report)")
    ap.add_argument("--labels", help="ground-truth JSON folder to score --csv against")
    ap.add_argument("--out", help="HTML file to write (default: in the runs folder)")
    ap.add_argument("--images", type=int, default=4, help="worst validation images to draw")
    args = cli.parse(ap, argv)
    # positionals: the experiment folder, or (with --ensemble) dotted config overrides
    folders = [a for a in args.overrides if "=" not in a]
    if args.ensemble == bool(folders) or len(folders) > 1:
        ap.error("give one experiment folder (runs/<experiment>), or --ensemble [--config ...]")
    args.experiment = folders[0] if folders else None
    return cli.run(lambda: report(args))


def report(args) -> int:
    if args.ensemble:
        path = write_ensemble_report(
            cli.load(args), args.csv, args.labels, args.out, args.checkpoints, args.images
        )
    else:
        path = write_run_report(args.experiment, args.out, args.images)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
