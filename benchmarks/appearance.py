"""How robust each augmentation set is to the way an X-ray looks: train on one appearance
of the phantom, validate on the same hands drawn with another.

    python benchmarks/appearance.py            # ~19 min on 2 idle CPU cores
    python benchmarks/appearance.py --quick    # ~3 min: wiring only, figures meaningless

The phantom of ``benchmarks/techniques.py`` (16 + 8 patients, 2048 px, seed 0) is drawn
twice: in the default appearance, which every model here trains on, and in the ``film``
appearance (docs/data.md: an S-shaped film curve, thicker brighter soft tissue, less bone
contrast, coarser trabeculae, detector blur, more noise), the same hands and labels with
other pixels. A U-Net (the techniques pair's, ``configs/demo.yaml`` at 160 px, 12 epochs)
is trained on fold 0 of 3 for each augmentation set and each training seed, and its
validation images (the fold's held-out patients) are scored in both appearances: the
same-appearance Dice, the cross-appearance Dice and their gap, at threshold 0.5, at 2048 px
as the leaderboard scores. Each figure is the mean over ``--seeds`` training seeds, with
its range; a set closes the gap only when its gap is below the preset's by more than the
preset gap's range over seeds.

The sets (``data.augment`` lists, albumentations' own form):

- ``preset``: the default list of this version (horizontal flip, shift-scale-rotate,
  brightness/contrast);
- ``intensity``: the preset's geometry, stronger brightness/contrast, gamma, Gaussian
  noise, blur and simulated low resolution (nnU-Net's intensity augmentations);
- ``elastic``: the preset plus an elastic deformation (p 0.3, the winning public recipe's);
- ``mix``: ``intensity`` plus the elastic deformation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from techniques import SEED, config, seed_suffix, spread, test_dice, verdict

from bonecomp.classes import CLASSES
from bonecomp.config import augment_from_preset
from bonecomp.data.cache import data_cache_dir
from bonecomp.data.folds import folds_path
from bonecomp.inference.thresholds import write_thresholds
from bonecomp.runs import run_dir
from bonecomp.testing import ensure_phantom
from bonecomp.training.fold import run_training

WORK = Path("/tmp/bonecomp-appearance")


def _t(name: str, **args) -> dict:
    """One ``data.augment`` entry, as ``A.to_dict`` writes a transform."""
    return {"__class_fullname__": name, **args}


PRESET = augment_from_preset({})  # this version's default list
FLIP, AFFINE, CONTRAST = PRESET
INTENSITY = [
    _t("RandomBrightnessContrast", brightness_limit=0.3, contrast_limit=0.3, p=0.7),
    _t("RandomGamma", gamma_limit=[70, 150], p=0.5),
    _t("GaussNoise", std_range=[0.02, 0.06], p=0.3),
    _t("GaussianBlur", blur_limit=[3, 5], p=0.2),
    _t("Downscale", scale_range=[0.5, 0.9], p=0.2),
]
ELASTIC = _t("ElasticTransform", alpha=30.0, sigma=5.0, p=0.3)
SETS = {
    "preset": PRESET,
    "intensity": [FLIP, AFFINE, *INTENSITY],
    "elastic": [FLIP, AFFINE, CONTRAST, ELASTIC],
    "mix": [FLIP, AFFINE, *INTENSITY, ELASTIC],
}


@dataclass
class Scores:
    """One model's validation Dice on both appearances."""

    same: float
    cross: float

    @property
    def gap(self) -> float:
        return self.same - self.cross


def validation_roots(args, fold: int = 0) -> dict[str, Path]:
    """The fold's validation images of each appearance as a data root whose test split
    they are (PNGs and JSONs linked, not copied), so the project's inference and scorer
    run on them unchanged: ``{"default": root, "film": root}``."""
    d = config(args).data
    folds = pd.read_csv(
        folds_path(data_cache_dir(d.cache_dir, d.root), d.n_splits, d.fold_seed, None)
    )
    held_out = set(folds.loc[folds["fold"] == fold, "image"])
    roots = {}
    for look, phantom in (("default", args.work / "phantom"), ("film", args.work / "film")):
        root = args.work / f"val_{look}"
        dcm = phantom / "train" / "DCM"
        for png in sorted(dcm.rglob("*.png")):
            if png.relative_to(dcm).as_posix() not in held_out:  # folds name images by rel
                continue
            label = phantom / "train" / "outputs_json" / png.parent.name / f"{png.stem}.json"
            for src, dst in ((png, root / "test" / "DCM"), (label, root / "test_labels")):
                link = dst / png.parent.name / src.name
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(src, link)
        roots[look] = root
    return roots


def train_sets(args) -> None:
    """Fold 0 of every set with every seed (kept when already trained)."""
    for name, augment in SETS.items():
        for k in range(args.seeds):
            cfg = config(
                args, "unet", seed_suffix(k),
                **{"data.augment": augment, "train.seed": SEED + k},
            )  # fmt: skip
            cfg.train.experiment = f"{name}{seed_suffix(k)}"
            if run_dir(cfg, 0).best.exists():
                continue
            t0 = time.perf_counter()
            res = run_training(cfg, 0, progress=False)
            cut = f", CUT: {res.cut}" if res.cut else ""  # a cut run's figures are the clock's
            print(f"  trained {cfg.train.experiment}: val Dice {res.best_dice:.4f} "
                  f"({time.perf_counter() - t0:.0f} s{cut})", flush=True)  # fmt: skip


def score_sets(args, roots: dict[str, Path]) -> dict[str, list[Scores]]:
    """Each set's models scored on both appearances' validation images."""
    flat = write_thresholds(args.work / "flat.json", [0.5] * len(CLASSES))
    out: dict[str, list[Scores]] = {}
    for name in SETS:
        out[name] = []
        for k in range(args.seeds):
            member = [{"experiment": f"{name}{seed_suffix(k)}", "folds": [0]}]
            dice = {
                look: test_dice(
                    args,
                    config(args, **{"data.root": str(root), "infer.ensemble": member}),
                    flat,
                    f"{name}{seed_suffix(k)}_{look}",
                )
                for look, root in roots.items()
            }
            out[name].append(Scores(dice["default"], dice["film"]))
    return out


def _cell(values: list[float]) -> str:
    v = np.asarray(values)
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{v.mean():.4f} ({v.min():.4f}-{v.max():.4f})"


def table(scores: dict[str, list[Scores]]) -> str:
    """Markdown: per set, same / cross Dice and the gap (mean and range over seeds), the
    gap's change against the preset and its verdict against the preset gap's range, and
    the same for the cross-appearance Dice itself (a gap can close by losing same-appearance
    Dice: only a gain in cross-appearance Dice makes a set worth adopting)."""
    ref = [s.gap for s in scores["preset"]]
    ref_cross = [s.cross for s in scores["preset"]]
    noise, cross_noise = spread(ref), spread(ref_cross)
    lines = [
        "| augmentation | same appearance | cross appearance | gap (same - cross) | "
        "gap vs preset | verdict on the gap | cross vs preset | verdict on cross |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in scores.items():
        gaps, cross = [s.gap for s in rows], [s.cross for s in rows]
        change = float(np.mean(gaps) - np.mean(ref))
        gain = float(np.mean(cross) - np.mean(ref_cross))
        if name == "preset":
            gap_verdict, cross_verdict = _reference(noise), _reference(cross_noise)
            delta = cross_delta = "-"
        else:
            delta, cross_delta = f"{change:+.4f}", f"{gain:+.4f}"
            gap_verdict = _beyond(verdict(-change, noise), "closes the gap", "widens the gap")
            cross_verdict = _beyond(verdict(gain, cross_noise), "gain", "loss")
        lines.append(
            f"| {name} | {_cell([s.same for s in rows])} | {_cell(cross)} | {_cell(gaps)} | "
            f"{delta} | {gap_verdict} | {cross_delta} | {cross_verdict} |"
        )
    return "\n".join(lines)


def _reference(noise: float | None) -> str:
    return "reference" if noise is None else f"reference: range over seeds {noise:.4f}"


def _beyond(word: str, gain: str, loss: str) -> str:
    """techniques.verdict's gain / loss in this table's words."""
    return {"gain": f"{gain} (beyond the spread)", "loss": f"{loss} (beyond the spread)"}.get(
        word, word
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=WORK, help="everything is written here")
    ap.add_argument("--train-patients", type=int, default=16)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--size", type=int, default=160, help="training size (px)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=6.0, help="time limit per training")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per set")
    ap.add_argument("--quick", action="store_true", help="tiny everything: checks the wiring")
    args = ap.parse_args(argv)
    args.test_patients = 1  # config() needs a test split; the study scores its own roots
    if args.quick:
        args.train_patients, args.size, args.epochs, args.minutes, args.seeds = 6, 64, 1, 0.5, 2
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for look, folder in (("default", "phantom"), ("film", "film")):
        ensure_phantom(args.work / folder, args.train_patients, args.test_patients,
                       seed=args.seed, appearance=look)  # fmt: skip
    train_sets(args)
    scores = score_sets(args, validation_roots(args))
    print(table(scores))
    n_val = len(list((args.work / "val_default" / "test" / "DCM").rglob("*.png")))
    print(
        f"\n{time.perf_counter() - t0:.0f} s; fold 0 of {args.folds} ({n_val} validation "
        f"images), {args.seeds} seeds per set, U-Net at {args.size} px, {args.epochs} epochs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
