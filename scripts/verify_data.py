"""Integrity check of a data root: lists every problem with its file; exit 1 if any."""

from __future__ import annotations

import argparse
import sys

from bonecomp.data.verify import verify_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root", help="data root (train/DCM, train/outputs_json, test/DCM)")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding PNGs")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    report = verify_dataset(args.root, workers=args.workers, progress=not args.quiet)
    for problem in report.problems:
        print(problem)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
