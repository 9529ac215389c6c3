"""What each leaderboard technique gains on the phantom: 3-fold OOF and test-set Dice.

    python benchmarks/techniques.py                     # ~64 min on 2 idle CPU cores
    python benchmarks/techniques.py --quick             # ~6 min: wiring only, figures meaningless

One run builds the table of docs/techniques.md: two small experiments (U-Net and FCN-8s
on ResNet-18, from scratch) trained on every fold of a phantom, then, row by row, the
baseline ensemble (uniform weights, threshold 0.5), + per-class thresholds, + class-wise
ensemble weights, + pseudo-labels (the tuned ensemble labels the test images, both
experiments are retrained on every fold with them, and the new pair is tuned again),
+ carpal crop (a U-Net trained on every fold on the carpal box at the same input size,
its weight per carpal tuned on OOF, pasted over the pseudo-label pair's carpals); and,
beside the stack, checkpoint averaging (the baseline with each member's averaged.pt,
the mean of its last ``train.average.last`` epochs, instead of its best.pt) and the
per-class clean-up (``tune_cleanup`` on the class-wise ensemble's OOF maps, against the
class-wise row). Every row gives the OOF Dice (all 29 classes and each carpal class, on
the training images' out-of-fold maps) and the test-set Dice of the submission the
row's settings write, scored by the project's own scorer against the phantom's test
labels. A row that does not help is reported as measured.

Then three tables:
- patch training + windows (``data.patch_size`` = ``--size`` on the image at twice that
  size) against the pair's whole-image U-Net at the same compute (same input pixels per
  step, same steps), every fold, with the small bones' OOF Dice and the time per fold;
- plain vs wrist-angle-stratified folds on a second phantom whose bent training wrists
  are concentrated in a few patients: how far each fold's validation Dice is from its
  test Dice (``stratified_folds``);
- single U-Net variants on the first ``--variant-folds`` folds (3: all of them by default),
  against the pair's U-Net on the same folds, each alone at threshold 0.5: Focal + Dice,
  Dice alone, and CLAHE as fixed preprocessing of the training cache and of every test
  image (``data.preprocess: [clahe]``; inference takes it from each checkpoint).

``--patch-study`` adds fold 0 of three patch variants (3x the epochs, patches of 0.7 of
the side, blind patches) beside the two rows of the patch table: where patches lose.

The noise: the pair is trained with ``--seeds`` training seeds (``train.seed`` 42, 43,
...; the phantom and the folds stay the same), and the baseline, thresholds and
class-wise rows are measured for each. Every table prints the range over seeds of its
reference row (the same technique retrained with another seed) and calls a delta a gain
or a loss only when it exceeds that range ("within noise" otherwise). The time limit per
fold (``--minutes``) is a safety net: the end of the run lists every training whose
schedule followed the clock instead of its updates (a loaded or slow machine), whose
figures then depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bonecomp.checkpoint import load_checkpoint
from bonecomp.classes import CARPALS, CLASSES, FINGERS, THUMB
from bonecomp.config import Config, load_config
from bonecomp.data.cache import data_cache_dir
from bonecomp.data.folds import folds_path
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.data.truth import GroundTruth
from bonecomp.data.wrist import BIN_EDGES, table_angles
from bonecomp.inference.carpal_stage import crop_oof_dice
from bonecomp.inference.class_weights import tune_ensemble
from bonecomp.inference.cleanup import tune_cleanup
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.pseudo_labels import write_pseudo_labels
from bonecomp.inference.thresholds import resolve_thresholds, tune_thresholds, write_thresholds
from bonecomp.metrics import DiceTable
from bonecomp.runs import crop_members, ensemble_members, run_dir
from bonecomp.submission import score_submission
from bonecomp.testing import DEMO_CONFIG, as_overrides, ensure_phantom
from bonecomp.training.fold import run_training

WORK = Path("/tmp/bonecomp-techniques")
FINGERTIPS = (THUMB[0], *(f[0] for f in FINGERS))  # the distal phalanges: the smallest bones
EXPERIMENTS = {"unet": {"model.arch": "unet"}, "fcn": {"model.arch": "fcn8s"}}
PSEUDO = "_pl"  # suffix of the experiments retrained with pseudo-labels
CROP = {"crop": {"model.arch": "unet", "data.crop": "carpal"}}  # the second stage
AVERAGE_LAST = 4  # train.average.last of every training: averaged.pt beside best.pt
# Single U-Net variants against the pair's U-Net (loss.terms {bce: 0.5, dice: 0.5}).
LOSSES = {
    "unet_focal": {"model.arch": "unet", "loss.terms": {"focal": 0.5, "dice": 0.5}},
    "unet_dice": {"model.arch": "unet", "loss.terms": {"dice": 1.0}},
}
CLAHE = {"unet_clahe": {"model.arch": "unet", "data.preprocess": ["clahe"]}}
LABELS = {
    "unet_patch": "U-Net on patches of the 2x image, windows",
    "unet": "U-Net alone, BCE + Dice (0.5 + 0.5)",
    "unet_focal": "U-Net, Focal + Dice (0.5 + 0.5)",
    "unet_dice": "U-Net, Dice alone",
    "unet_clahe": "U-Net + CLAHE (train and test)",
    "unet_patch_long": "patches, 3x the epochs and time",
    "unet_patch_wide": "patches of 0.7 of the side (about 2x the pixels per step)",
    "unet_patch_blind": "patches, none centred on a bone (patch_foreground 0)",
}


def patch_experiment(args) -> dict[str, dict]:
    """Patch training at the pair's compute: ``--size`` px patches of the image at twice
    that size (as many pixels per step as the whole-image U-Net, each image seen at twice
    its resolution), validated, OOF-mapped and predicted in windows at overlap 0.5."""
    s = args.size
    keys = {"model.arch": "unet", "data.image_size": 2 * s, "data.patch_size": s}
    overlap = {"train.val_overlap": 0.5, "infer.overlap": 0.5}
    return {"unet_patch": {**keys, **overlap, "train.oof_size": 2 * s}}


def patch_study(args) -> dict[str, dict]:
    """Where the patch row's loss comes from (``--patch-study``, fold 0 only): the same
    patches for 3x the epochs and time, patches of 0.7 of the image's side (about 2x the
    pixels per step), and blind patches (``data.patch_foreground: 0``)."""
    base = patch_experiment(args)["unet_patch"]
    wide = max(32, int(1.4 * args.size) // 32 * 32)  # a multiple of the stride
    long = {"train.epochs": 3 * args.epochs, "train.val_every": 3 * args.epochs}
    return {
        "unet_patch_long": {**base, **long, "train.max_train_minutes": 3 * args.minutes},
        "unet_patch_wide": {**base, "data.patch_size": wide},
        "unet_patch_blind": {**base, "data.patch_foreground": 0.0},
    }


SEED = 42  # train.seed of the recipe (configs/base.yaml): the first seed's experiments


def seed_suffix(k: int) -> str:
    """The experiments' name suffix of the ``k``-th training seed ("" for the first)."""
    return f"_s{SEED + k}" if k else ""


@dataclass
class Row:
    name: str
    oof: DiceTable | None  # None: not measured (the OOF maps are best.pt's)
    test: float | None
    note: str = ""
    ref: Row | None = None  # the deltas' reference (None: the table's first row)
    seeds: list[Row] | None = None  # the same row measured with every training seed


@dataclass
class Noise:
    """The range (max - min) over training seeds of a reference row: what retraining
    the same technique with another seed moves, and so the least a gain must exceed."""

    oof: float | None
    test: float | None
    n: int  # seeds

    @classmethod
    def of(cls, row: Row) -> Noise:
        seeds = row.seeds or [row]
        oof = [r.oof.mean for r in seeds if r.oof is not None]
        test = [r.test for r in seeds if r.test is not None]
        return cls(spread(oof), spread(test), len(seeds))


def spread(values: list[float]) -> float | None:
    """The range (max - min) of a figure over seeds; None for fewer than two."""
    return max(values) - min(values) if len(values) > 1 else None


def verdict(delta: float, noise: float | None) -> str:
    """A delta against the reference, worded by the reference's range over seeds."""
    if noise is None:
        return "no spread measured"
    if delta > noise:
        return "gain"
    return "loss" if delta < -noise else "within noise"


def config(args, experiment: str | None = None, suffix: str = "", **extra) -> Config:
    """The demo recipe at the run's size on the run's phantom, written under ``--work``;
    ``suffix`` names the retrained (pseudo-label) pair of experiments."""
    work = args.work
    values = {
        "data.root": str(work / "phantom"),
        "data.cache_dir": str(work / "cache"),
        "data.image_size": args.size,
        "data.n_splits": args.folds,
        "data.num_workers": 0,
        "train.output_dir": str(work / "runs"),
        "train.epochs": args.epochs,
        "train.batch_size": args.batch,
        "train.max_train_minutes": args.minutes,
        "train.val_every": args.epochs,
        "train.oof_size": args.size,
        "train.report": False,
        "train.device": "cpu",
        "infer.name": "techniques",
        "infer.num_workers": 0,
        "train.average": {"last": min(AVERAGE_LAST, args.epochs)},  # the averaging row
        "infer.ensemble": [
            {"experiment": e + suffix, "folds": list(range(args.folds))} for e in EXPERIMENTS
        ],
        **extra,
    }
    if experiment:
        every = {**EXPERIMENTS, **CROP, **LOSSES, **CLAHE}
        keys = {**every, **patch_experiment(args), **patch_study(args)}[experiment]
        values.update({"train.experiment": experiment + suffix, **keys})
    return load_config(DEMO_CONFIG, as_overrides(values))


def train_all(
    args, suffix: str = "", names=EXPERIMENTS, n_folds: int | None = None, **extra
) -> None:
    """The first ``n_folds`` folds (default all) of the experiments ``names`` (kept when
    already trained: the run can be resumed)."""
    for e in names:
        cfg = config(args, e, suffix, **extra)
        for fold in range(n_folds or args.folds):
            if run_dir(cfg, fold).best.exists():
                continue
            t0 = time.perf_counter()
            res = run_training(cfg, fold, progress=False)
            print(
                f"  trained {e}{suffix} fold {fold}: val Dice {res.best_dice:.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


def train_seeds(args) -> None:
    """The pair with every further training seed (``--seeds``), on every fold."""
    for k in range(1, args.seeds):
        train_all(args, seed_suffix(k), **{"train.seed": SEED + k})


def test_dice(args, cfg: Config, thresholds: Path, tag: str) -> float:
    """Write the row's submission with ``thresholds`` and score it on the test labels."""
    cfg.infer.thresholds = str(thresholds)
    csv = args.work / "submissions" / f"{tag}.csv"
    predict_submission(cfg, ensemble_members(cfg), csv, progress=False)
    root = Path(cfg.data.root)
    table, _ = score_submission(
        csv, root / "test_labels", png_shapes(discover(root, "test")), progress=False
    )
    return table.mean


def averaging_row(args, cfg: Config, flat: Path) -> Row:
    """The baseline ensemble with every member's ``averaged.pt`` (the last
    ``AVERAGE_LAST`` epochs' mean, BatchNorm recomputed) instead of its ``best.pt``, at
    threshold 0.5; the mean validation Dice of the members, averaged vs best, in the note."""
    avg = config(args, **{"infer.ensemble": [
        {"experiment": e, "folds": list(range(args.folds)), "checkpoint": "averaged"}
        for e in EXPERIMENTS
    ]})  # fmt: skip
    pairs = [
        (load_checkpoint(m.checkpoint)["metric"], load_checkpoint(m.run.best)["metric"])
        for m in ensemble_members(avg, ensemble=True)
    ]
    a, b = (float(np.mean(x)) for x in zip(*pairs, strict=True))
    note = f"members' val Dice: averaged.pt {a:.4f} vs best.pt {b:.4f}; OOF maps are best.pt's"
    return Row(
        "checkpoint averaging (vs baseline)", oof=None, test=test_dice(args, avg, flat, "avg"),
        note=note,
    )  # fmt: skip


def cleanup_row(args, cfg: Config, members, weights: Path) -> Row:
    """The class-wise ensemble's masks with the per-class clean-up chosen on its OOF maps
    (``tune_cleanup``: largest component, small components, holes; kept per class only
    where OOF Dice gains); compare with the class-wise row."""
    cfg.infer.thresholds = str(weights)
    out = args.work / "tuned" / "cleanup.json"
    res, path = tune_cleanup(cfg, members, out=out, progress=False)
    kept = res.cleanup.table
    rules = "; ".join(f"{k} {'+'.join(v)}" for k, v in kept.items()) or "none"
    note = (
        f"rules kept on OOF for {len(kept)} class(es): {rules}; OOF "
        f"{res.before.mean:.4f} -> {res.after.mean:.4f} over the class-wise row"
    )
    test = test_dice(args, cfg, path, "cc")
    return Row("class-wise + clean-up (vs class-wise)", res.after, test, note)


def tuned_rows(args, k: int = 0) -> tuple[list[Row], Path, Path]:
    """The baseline, thresholds and class-wise rows of the pair trained with the ``k``-th
    seed; with the class-wise table's path and the flat (0.5) thresholds file."""
    sfx = seed_suffix(k)
    cfg = config(args, suffix=sfx)
    members = ensemble_members(cfg, ensemble=True)
    tuned = args.work / "tuned"
    tuned.mkdir(exist_ok=True)
    thr, thr_path = tune_thresholds(
        cfg, members, out=tuned / f"thresholds{sfx}.json", progress=False
    )
    ens, ens_path = tune_ensemble(
        cfg, members, out=tuned / f"class_weights{sfx}.json", progress=False
    )
    flat = write_thresholds(tuned / "flat.json", [0.5] * len(CLASSES))
    rows = [
        Row("baseline (uniform weights, 0.5)", ens.before,
            test_dice(args, cfg, flat, f"base{sfx}")),
        Row("+ per-class thresholds", thr.after, test_dice(args, cfg, thr_path, f"thr{sfx}")),
        Row("+ class-wise ensemble weights", ens.after,
            test_dice(args, cfg, ens_path, f"w{sfx}")),
    ]  # fmt: skip
    return rows, ens_path, flat


def measure(args) -> list[Row]:
    """The table's rows, in the order the techniques stack up; the first three also
    with every further training seed (``Row.seeds``)."""
    cfg = config(args)
    members = ensemble_members(cfg, ensemble=True)
    rows, ens_path, flat = tuned_rows(args)
    tuned = args.work / "tuned"
    others = [tuned_rows(args, k)[0] for k in range(1, args.seeds)]
    for i, row in enumerate(rows):
        row.seeds = [row, *(o[i] for o in others)]
    averaging = averaging_row(args, cfg, flat)
    cleanup = cleanup_row(args, cfg, members, ens_path)
    cleanup.ref = rows[2]  # its deltas: against the class-wise row it cleans up
    # pseudo-labels from the tuned ensemble, then the pair retrained with them and re-tuned
    cfg.infer.thresholds = str(ens_path)
    folder = args.work / "pseudo"
    if not folder.exists():
        write_pseudo_labels(cfg, members, folder, progress=False)
    train_all(args, PSEUDO, **{"train.pseudo_labels": str(folder)})
    cfg_pl = config(args, suffix=PSEUDO)
    members_pl = ensemble_members(cfg_pl, ensemble=True)
    pl, pl_path = tune_ensemble(cfg_pl, members_pl, out=tuned / "pseudo.json", progress=False)
    rows.append(Row("+ pseudo-labels", pl.after, test_dice(args, cfg_pl, pl_path, "pl")))
    # the carpal crop stage over the pseudo-label pair, its weight per carpal tuned on OOF
    train_all(args, names=CROP)
    crop = {"experiment": next(iter(CROP)), "folds": list(range(args.folds))}
    cfg_c = config(args, suffix=PSEUDO, **{"infer.crop": crop, "infer.thresholds": str(pl_path)})
    first = ensemble_members(cfg_c, ensemble=True)
    thresholds, _ = resolve_thresholds(cfg_c, first)
    res = crop_oof_dice(
        first, crop_members(cfg_c), GroundTruth.of(cfg_c.data), thresholds, progress=False
    )
    weights = res.tuned()
    oof = DiceTable(pl.after.per_class.copy(), pl.after.n_images)
    oof.per_class[list(CARPALS)] = [res.dice[k, res.grid.index(w)] for k, w in enumerate(weights)]
    crop["weight"] = weights
    cfg_c = config(args, suffix=PSEUDO, **{"infer.crop": crop})
    note = (
        f"carpal OOF: crop pasted into the truth box over the first stage at uniform weights, "
        f"{res.without.mean():.3f} -> {oof.per_class[list(CARPALS)].mean():.3f}; "
        f"weights {', '.join(f'{w:g}' for w in weights)}"
    )
    rows.append(Row("+ carpal crop", oof, test_dice(args, cfg_c, pl_path, "crop"), note))
    rows += [averaging, cleanup]  # beside the stack: against the baseline / class-wise rows
    return rows


def stratified_folds(args) -> str:
    """Plain vs wrist-angle-stratified folds on a phantom whose bent training wrists are
    concentrated in ``--folds`` patients: a U-Net per fold under each rule, and how far
    each fold's validation Dice is from the same model's test-set Dice (threshold 0.5).
    The gain is in the honesty of the folds (bent hands in every validation), not in
    the score: the table gives the bent hands per fold's validation beside the gaps."""
    root = args.work / "phantom_bent"
    ensure_phantom(
        root, args.train_patients, args.test_patients, seed=args.seed, bent_patients=args.folds
    )
    angles = table_angles(discover(root))
    flat = write_thresholds(args.work / "tuned" / "flat.json", [0.5] * len(CLASSES))
    lines = [
        "| folds | bent hands in each fold's validation | val Dice per fold | test Dice per "
        "fold | mean abs(val - test) | spread of val (max - min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule in (None, "wrist_angle"):
        keys = {
            "data.root": str(root),
            "data.fold_stratify": rule,
            "train.epochs": args.strata_epochs,
            "train.val_every": args.strata_epochs,
        }
        name = f"strata_{rule or 'plain'}"
        cfg = config(args, "unet", **keys)
        cfg.train.experiment = name
        val, test = [], []
        for fold in range(args.folds):
            run = run_dir(cfg, fold)
            if not run.best.exists():
                run_training(cfg, fold, progress=False)
            val.append(float(pd.read_csv(run.dice_csv)["dice"].mean()))
            member = [{"experiment": name, "folds": [fold]}]
            one = config(args, **keys, **{"infer.ensemble": member})
            test.append(test_dice(args, one, flat, f"{name}_{fold}"))
        d = cfg.data
        folds = pd.read_csv(
            folds_path(data_cache_dir(d.cache_dir, d.root), d.n_splits, d.fold_seed, rule)
        )
        bent = (angles.reindex(folds["image"]).abs() >= BIN_EDGES[0]).to_numpy()
        per_fold = [int(bent[(folds["fold"] == k).to_numpy()].sum()) for k in range(args.folds)]
        gap = np.abs(np.subtract(val, test))
        lines.append(
            f"| {'stratified (wrist_angle)' if rule else 'plain GroupKFold'} | "
            f"{', '.join(map(str, per_fold))} | {', '.join(f'{v:.3f}' for v in val)} | "
            f"{', '.join(f'{t:.3f}' for t in test)} | {gap.mean():.4f} | "
            f"{max(val) - min(val):.4f} |"
        )
    return "\n".join(lines)


def single_row(
    args, experiment: str, flat: Path, n_folds: int | None = None, seeds: bool = False
) -> Row:
    """One experiment alone (its first ``n_folds`` folds, default all) at threshold 0.5:
    OOF and test-set Dice; ``seeds``: also with every further training seed (the pair's
    U-Net, the reference of the variant and patch tables)."""
    folds = list(range(n_folds or args.folds))
    rows = []
    for k in range(args.seeds if seeds else 1):
        name = experiment + seed_suffix(k)
        cfg = config(args, **{"infer.ensemble": [{"experiment": name, "folds": folds}]})
        members = ensemble_members(cfg, ensemble=True)
        out = args.work / "tuned" / f"{name}_{len(folds)}.json"
        res, _ = tune_thresholds(cfg, members, out=out, progress=False)  # .before: at 0.5
        rows.append(Row(LABELS[experiment], res.before, test_dice(args, cfg, flat, name)))
    rows[0].seeds = rows if seeds else None
    return rows[0]


def loss_rows(args, flat: Path) -> list[Row]:
    """Focal + Dice and Dice alone (issue 18), each a U-Net on ``--variant-folds`` folds."""
    k = args.variant_folds
    train_all(args, names=LOSSES, n_folds=k)
    return [single_row(args, e, flat, k) for e in LOSSES]


def clahe_row(args, flat: Path) -> Row:
    """CLAHE as fixed preprocessing (``data.preprocess: [clahe]``): the cache is built
    with it, and inference applies it to every test image because the checkpoints say so
    (the row's inference config does not name it)."""
    train_all(args, names=CLAHE, n_folds=args.variant_folds)
    return single_row(args, next(iter(CLAHE)), flat, args.variant_folds)


def variant_rows(args) -> list[Row]:
    """The single U-Net variants on the first ``--variant-folds`` folds, after their
    reference: the pair's U-Net alone on the same folds."""
    flat = write_thresholds(args.work / "tuned" / "flat.json", [0.5] * len(CLASSES))
    k = args.variant_folds
    ref = single_row(args, "unet", flat, k, seeds=True)
    return [ref, *loss_rows(args, flat), clahe_row(args, flat)]


def patch_rows(args) -> tuple[list[Row], str]:
    """Whole-image U-Net (the pair's) against patch training + windows at the same
    compute, every fold; the small bones' OOF Dice and the training time per fold."""
    flat = write_thresholds(args.work / "tuned" / "flat.json", [0.5] * len(CLASSES))
    train_all(args, names=patch_experiment(args))
    rows = [single_row(args, "unet", flat, seeds=True), single_row(args, "unet_patch", flat)]
    small = {"carpals": list(CARPALS), "fingertips": list(FINGERTIPS)}
    head = " | ".join(f"OOF {k} (mean)" for k in small)
    lines = [f"| | {head} | s per fold (train / all) |", "| --- |" + " --- |" * (len(small) + 1)]
    for name, r in zip(("unet", "unet_patch"), rows, strict=True):
        cfg = config(args, name)
        runs = [pd.read_csv(run_dir(cfg, f).summary) for f in range(args.folds)]
        train = np.mean([r["train_time"].sum() for r in runs])
        total = np.mean([r["elapsed"].max() for r in runs])
        cells = [f"{r.oof.per_class[idx].mean():.4f}" for idx in small.values()]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {train:.0f} / {total:.0f} |")
    return rows, "\n".join(lines)


def patch_study_table(args) -> str:
    """Fold 0's validation Dice (windows, at 2048) of the whole-image U-Net, the patch row
    and the ``patch_study`` variants: the mean, the fingers' tips, the thumb's tip and
    the carpals, and the training time."""
    names = ["unet", *patch_experiment(args), *patch_study(args)]
    train_all(args, names=list(patch_study(args)), n_folds=1)
    groups = {
        "fingertips": [f[0] for f in FINGERS],
        "thumb tip": [THUMB[0]],
        "carpals": list(CARPALS),
    }
    head = " | ".join(groups)
    lines = [f"| fold 0 | val Dice | {head} | train s |", "| --- |" + " --- |" * (len(groups) + 2)]
    for name in names:
        run = run_dir(config(args, name), fold=0)
        dice = pd.read_csv(run.dice_csv)["dice"].to_numpy()
        train = pd.read_csv(run.summary)["train_time"].sum()
        cells = [f"{dice.mean():.4f}", *(f"{dice[idx].mean():.3f}" for idx in groups.values())]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {train:.0f} |")
    return "\n".join(lines)


def table(rows: list[Row], n_oof: int) -> str:
    """Markdown: OOF mean and per carpal class, then test Dice; deltas against each row's
    ``ref``, else the first row, each with its verdict against the reference's range
    over training seeds (``Noise``)."""
    head = ["technique", "OOF mean", *(CLASSES[i] for i in CARPALS), "test Dice", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        base = r.ref or rows[0]
        noise = Noise.of(base)
        cells, said = [r.name], []
        if r.oof is None:
            cells += ["-"] * (1 + len(CARPALS))
        else:
            d = r.oof.mean - base.oof.mean
            cells.append(f"{r.oof.mean:.4f}" + (f" ({d:+.4f})" if r is not base else ""))
            cells += [f"{r.oof.per_class[i]:.3f}" for i in CARPALS]
            if r is not base:
                said.append(f"OOF {verdict(d, noise.oof)}")
        if r.test is None:
            cells.append("-")
        else:
            dt = r.test - base.test if base.test is not None else 0.0
            cells.append(f"{r.test:.4f}" + (f" ({dt:+.4f})" if r is not base else ""))
            if r is not base:
                said.append(f"test {verdict(dt, noise.test)}")
        if r is base:
            said.append(_range_note(noise))
        cells.append("; ".join(said))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\n{r.name}: {r.note}" for r in rows if r.note]
    lines += [f"\n{r.name}, per seed: {_per_seed(r)}" for r in rows if r.seeds and len(r.seeds) > 1]
    lines.append(
        f"\nOOF: {n_oof} training images, each predicted by the folds that did not train on it."
    )
    return "\n".join(lines)


def _range_note(noise: Noise) -> str:
    if noise.n < 2:
        return "reference (one seed: no spread)"
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    return f"reference; range over {noise.n} seeds: OOF {fmt(noise.oof)}, test {fmt(noise.test)}"


def _per_seed(row: Row) -> str:
    return ", ".join(
        f"OOF {r.oof.mean:.4f} / test {r.test:.4f}" for r in row.seeds if r.oof is not None
    )


def clock_led(args) -> list[str]:
    """The trainings of this run whose schedule followed the clock (``clock_from`` in
    summary.csv: the time limit bound, so their figures depend on the machine)."""
    out = []
    for summary in sorted((args.work / "runs").glob("*/fold*/summary.csv")):
        if "clock_from" in pd.read_csv(summary, nrows=0).columns:
            out.append(f"{summary.parent.parent.name}/{summary.parent.name}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=WORK, help="everything is written here")
    ap.add_argument("--train-patients", type=int, default=16)
    ap.add_argument("--test-patients", type=int, default=8)
    ap.add_argument("--folds", type=int, default=3, help="folds of every experiment")
    ap.add_argument("--size", type=int, default=160, help="training size (px)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2, help="small batches: more updates")
    ap.add_argument(
        "--minutes", type=float, default=6.0,
        help="training time limit per fold: a safety net (about 80 s on 2 idle cores)",
    )  # fmt: skip
    ap.add_argument(
        "--seeds", type=int, default=3,
        help="training seeds of the pair (train.seed 42, 43, ...): each table's noise",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument(
        "--strata-epochs", type=int, default=6,
        help="epochs per fold of the stratified-folds rows (2 x --folds runs)",
    )  # fmt: skip
    ap.add_argument(
        "--variant-folds", type=int, default=3,
        help="folds trained for the loss and CLAHE rows (and their U-Net reference)",
    )  # fmt: skip
    ap.add_argument(
        "--patch-study", action="store_true",
        help="also train fold 0 of three patch variants: longer, wider, blind (about 7 min)",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny everything: checks the wiring")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_patients, args.test_patients, args.folds = 6, 2, 3
        args.size, args.epochs, args.minutes, args.strata_epochs = 64, 1, 0.2, 1
        args.variant_folds, args.seeds = 2, 2
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ensure_phantom(args.work / "phantom", args.train_patients, args.test_patients, seed=args.seed)
    train_all(args)
    train_seeds(args)
    rows = measure(args)
    n_oof = rows[0].oof.n_images
    print(table(rows, n_oof))
    print("\nStratified folds (phantom with bent wrists in a few training patients):")
    print(stratified_folds(args))
    print("\nPatch training + windows against whole images at the same compute:\n")
    rows, small = patch_rows(args)
    print(table(rows, n_oof))
    print("\n" + small)
    if args.patch_study:
        print("\nWhere the patch row loses (fold 0, validation):\n")
        print(patch_study_table(args))
    k = args.variant_folds
    print(f"\nSingle U-Net variants on {k} folds (deltas against the U-Net alone):\n")
    variants = variant_rows(args)
    print(table(variants, variants[0].oof.n_images))
    patients = f"{args.train_patients} + {args.test_patients} patients (seed {args.seed})"
    led = clock_led(args)
    print(
        "\nTrainings whose schedule followed the clock (--minutes bound; their figures "
        f"depend on the machine's speed): {', '.join(led) if led else 'none'}"
    )
    print(
        f"\n{time.perf_counter() - t0:.0f} s; {args.folds} folds of {list(EXPERIMENTS)} at "
        f"{args.size} px, {patients}"
    )
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
