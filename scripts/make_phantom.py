"""Write the synthetic hand X-ray phantom (the docs/format.md layout) into a folder.

Example: python scripts/make_phantom.py --out data/phantom --train-patients 10 --test-patients 4
"""

from __future__ import annotations

import argparse
import time

from bonecomp.data.phantom import make_phantom


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data root to write train/, test/ into")
    parser.add_argument("--train-patients", type=int, default=10)
    parser.add_argument("--test-patients", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="default: min(4, CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing phantom")
    parser.add_argument(
        "--bent-patients",
        type=int,
        default=None,
        help="this many training patients bend both wrists (18-30 degrees towards the ulna, or "
        "70 %% of that the other way), the others none (default: each hand by chance, ~11 %%)",
    )
    parser.add_argument(
        "--appearance",
        default="default",
        help="how the images look: default, or film (S-shaped film curve, thicker soft "
        "tissue, less bone contrast, coarser texture, blur, more noise); same hands either way",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_phantom(
            args.out,
            train_patients=args.train_patients,
            test_patients=args.test_patients,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            overwrite=args.overwrite,
            bent_patients=args.bent_patients,
            appearance=args.appearance,
        )
    except ValueError as e:
        parser.exit(2, f"make_phantom: error: {e}\n")
    print(
        f"phantom: {args.train_patients} train patients ({summary.n_train_images} images), "
        f"{args.test_patients} test patients ({summary.n_test_images} images) "
        f"at {summary.size} px, {summary.appearance} appearance, in {summary.root} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    print(summary.stats.describe())


if __name__ == "__main__":
    main()
