"""Validate a submission CSV against the test set; optionally score it or compare it.

    python scripts/check_submission.py submissions/x.csv --data data/phantom
    python scripts/check_submission.py submissions/x.csv --data data/phantom \
        --labels data/phantom/test_labels
    python scripts/check_submission.py a.csv --data ROOT --compare b.csv
"""

from __future__ import annotations

import argparse
import sys

from bonecomp import cli
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.submission import compare_submissions, score_submission, validate_submission


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("csv", help="submission CSV")
    ap.add_argument("--data", required=True, help="data root holding test/DCM")
    ap.add_argument("--labels", help="folder of ground-truth JSONs (ID*/<stem>.json) to score")
    ap.add_argument("--compare", help="a second CSV: per-class Dice of CSV against it")
    args = ap.parse_args(argv)
    return cli.run(lambda: check(args))


def check(args) -> int:
    test = discover(args.data, "test")
    shapes = png_shapes(test)
    report = validate_submission(args.csv, test["name"].tolist(), list(shapes.values()))
    for problem in report.problems:
        print(problem)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(report.summary())
    if not report.ok:
        return 1
    if args.labels:
        table, _ = score_submission(args.csv, args.labels, shapes)
        print(table.format())
        print(f"mean Dice {table.mean:.4f} over {table.n_images} images")
    if args.compare:
        table = compare_submissions(args.csv, args.compare, shapes)
        print(table.format(labels=("vs other", "")))
        print(f"mean Dice against {args.compare}: {table.mean:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
