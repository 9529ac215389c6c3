"""Carpal OOF Dice with and without the carpal crop stage (infer.crop), and the per-class
crop weights that OOF prefers.

    python scripts/crop_oof.py --config configs/carpal_crop_1024.yaml
    python scripts/crop_oof.py --config configs/demo_carpal.yaml

The first stage is infer.ensemble, resolved as scripts/infer.py resolves it, with its
thresholds; the crop stage is infer.crop (its folds' out-of-fold maps, pasted into the
carpal box at each weight of --grid, 0 = without). Prints one row per carpal class.
"""

from __future__ import annotations

import sys

from bonecomp import cli
from bonecomp.classes import CARPALS, CLASSES
from bonecomp.data.truth import GroundTruth
from bonecomp.inference.carpal_stage import WEIGHT_GRID, crop_oof_dice
from bonecomp.inference.class_weights import resolve_class_weights
from bonecomp.inference.thresholds import resolve_thresholds
from bonecomp.runs import RunError, crop_members, ensemble_members


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--grid", nargs="+", type=float, default=WEIGHT_GRID, help="crop weights")
    ap.add_argument("--min-gain", type=float, default=1e-3, help="keep 0 unless beaten by this")
    args = cli.parse(ap, argv)
    return cli.run(lambda: report(args))


def report(args) -> int:
    cli.check_grid(args.grid, closed=True)  # the options, before any OOF map is read
    cli.check_min_gain(args.min_gain)
    cfg = cli.load(args)
    first, crop = ensemble_members(cfg), crop_members(cfg)
    if not crop:
        raise RunError("infer.crop.experiment is null: name the crop experiment to measure")
    thresholds, source = resolve_thresholds(cfg, first)
    _, table, weights_from = resolve_class_weights(cfg, first)
    print(f"first stage: {len(first)} fold(s), weights: {weights_from}; crop stage: "
          f"{len(crop)} fold(s) of {cfg.infer.crop.experiment}; thresholds: {source}")  # fmt: skip
    res = crop_oof_dice(
        first,
        crop,
        GroundTruth.of(cfg.data),
        thresholds,
        args.grid,
        not args.quiet,
        class_weights=table,
    )
    tuned = res.tuned(args.min_gain)
    last = max(res.grid)
    print(f"{'class':<11} {'without':>8} {f'w={last:g}':>8} {'best w':>7} {'tuned':>8}")
    for k, c in enumerate(CARPALS):
        best = res.dice[k, res.grid.index(tuned[k])]
        print(f"{CLASSES[c]:<11} {res.without[k]:8.4f} {res.at(last)[k]:8.4f} "
              f"{tuned[k]:7.2f} {best:8.4f}")  # fmt: skip
    mean_tuned = sum(res.dice[k, res.grid.index(w)] for k, w in enumerate(tuned)) / len(tuned)
    print(f"carpal OOF mean Dice over {res.n_images} images: without {res.without.mean():.4f}, "
          f"crop w={last:g} {res.at(last).mean():.4f}, tuned {mean_tuned:.4f}")  # fmt: skip
    print(f"infer.crop.weight=[{','.join(f'{w:g}' for w in tuned)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
