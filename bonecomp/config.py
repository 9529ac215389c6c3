"""Experiment configuration: YAML files -> typed dataclasses, with dotted CLI overrides.

Every key is declared once, as a dataclass field made by ``key`` (a section by
``section``): its type (the annotation), its default, its one-line documentation, the
range check of its value, and whether ``--resume`` may change it. From those fields come
the loader's type checks, ``check_values``, ``configs/base.yaml`` (written by
``python scripts/write_base_config.py`` / ``make base-config``; a test fails when it is
stale) and ``resume_may_change`` (the keys ``training.state.check_resumable`` lets
differ). A new key is one ``key(...)`` line plus the code that reads it::

    warmup_frac: float = key(0.1, "share of the epoch spent warming up",
                             check=lambda v: 0 <= v < 1, want="must be in [0, 1)")

Rules between keys (warm-up <= epochs, folds < data.n_splits, ...) are in
``_cross_field_problems``, each worded once; names that need a registry (architecture,
encoder, loss terms, optimizer, TTA) in ``bonecomp.checks.check_config``.

A recipe YAML may name a parent with ``extends: base.yaml`` (path relative to the file);
sections merge key by key, any value (a list, or a mapping such as ``loss.terms``) is
replaced. Unknown keys, wrong types, non-finite floats and values out of range are errors
on one line that name the key and where its value came from (the YAML file, or "command
line"), so a typo never silently falls back to a default.

Why dataclass field metadata and not pydantic (2.x is importable here, but not a declared
dependency): the loader already turns YAML into these dataclasses with one-line errors
naming the file or override of each value, which pydantic's multi-line
``ValidationError`` would need a wrapper to give; pydantic would not write base.yaml or
know the resume rule either, so the metadata would still be ours. Metadata keeps the
plain dataclasses every module uses (``dataclasses.asdict`` for checkpoints, tests
building ``TrainConfig(lr=...)``) and adds no dependency. The loader is hand-written
rather than OmegaConf for the same reason (~150 lines, one-line errors with sources).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from bonecomp.fileio import write_text

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault.

    ``key`` is the dotted key when known, so a caller can add where its value came from.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ----------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class KeyInfo:
    """What one field declares besides its type and default (see ``key``)."""

    doc: str
    check: Callable[[Any], Any] | None = None
    want: str = ""
    resume: bool = False
    finite: bool = True
    section: bool = False


_META = "bonecomp"


def key(
    default: Any,
    doc: str,
    *,
    check: Callable[[Any], Any] | None = None,
    want: str = "",
    resume: bool = False,
    finite: bool = True,
) -> Any:
    """A config key: a dataclass field with its ``default`` and everything else about it.

    ``doc``: one line, the key's comment in ``configs/base.yaml`` (wrapped there if long).
    ``check``: a test of the value (never called with None: an optional key may always
    be null); a value it rejects is the error ``<key> <want>, got <value>``, so ``want``
    reads like "must be >= 1" (add "or null" for an optional key).
    ``resume``: ``--resume`` may change the value (it says how or where the run
    computes, not what).
    ``finite``: float values (also inside lists and mappings) must not be inf or nan.
    A list or mapping default is copied for each instance.
    """
    if check is not None and not want:
        raise TypeError(f"key({default!r}, {doc!r}): a check needs want='must be ...'")
    meta = {_META: KeyInfo(doc, check, want, resume, finite)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str = "", *, resume: bool = False) -> Any:
    """A nested section (a dataclass of keys); ``resume``: ``--resume`` may change any of
    its keys."""
    return dataclasses.field(
        default_factory=cls, metadata={_META: KeyInfo(doc, resume=resume, section=True)}
    )


def key_info(f: dataclasses.Field) -> KeyInfo:
    """The declaration of field ``f``; a field made without ``key``/``section`` is a bug."""
    try:
        return f.metadata[_META]
    except KeyError:
        raise TypeError(
            f"config field {f.name!r} is not declared with key() or section()"
        ) from None


def _positive_multiple_of_32(v: int) -> bool:
    return v > 0 and v % 32 == 0


def _prob(v: float) -> bool:
    return 0 <= v <= 1


def _name(v: str) -> bool:
    return bool(v) and "/" not in v


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PROB = "must be a probability in [0, 1]"
DEVICE_WANT = "must be auto, cpu, mps, cuda or cuda:<index>"
MULTIPLE_OF_32 = "must be a positive multiple of 32"


@dataclass
class AugmentConfig:
    """Training augmentation (albumentations); validation uses none."""

    hflip: float = key(0.5, "probability of a horizontal flip", check=_prob, want=PROB)
    vflip: float = key(0.0, "probability of a vertical flip", check=_prob, want=PROB)
    shift: float = key(
        0.06, "fraction of the side", check=lambda v: 0 <= v < 1, want="must be in [0, 1)"
    )
    scale: float = key(0.1, "+- fraction", check=lambda v: 0 <= v < 1, want="must be in [0, 1)")
    rotate: float = key(
        20.0,
        "+- degrees: test hands are often bent at the wrist",
        check=lambda v: 0 <= v <= 180,
        want="must be in [0, 180] degrees",
    )
    affine_p: float = key(
        0.7, "probability of the shift-scale-rotate above", check=_prob, want=PROB
    )
    brightness_contrast: float = key(
        0.2,
        "+- fraction of brightness and of contrast",
        check=lambda v: 0 <= v <= 1,
        want="must be in [0, 1]",
    )
    brightness_contrast_p: float = key(
        0.5, "probability of the brightness/contrast change", check=_prob, want=PROB
    )
    clahe_p: float = key(
        0.0,
        "probability of a random CLAHE (local contrast); data.preprocess applies it always",
        check=_prob,
        want=PROB,
    )


@dataclass
class DataConfig:
    root: str = key(
        "data/competition",
        "docs/format.md layout: train/DCM, train/outputs_json, test/DCM",
        resume=True,
    )
    image_size: int = key(
        512,
        "square training size, a multiple of 32; the cache is built at it",
        check=_positive_multiple_of_32,
        want=MULTIPLE_OF_32,
    )
    cache_dir: str = key(
        "cache", "training cache and folds file per data root, built once", resume=True
    )
    n_splits: int = key(
        5, "GroupKFold by patient folder (>= 2)", check=lambda v: v >= 2, want="must be >= 2"
    )
    fold_seed: int | None = key(
        None, "null: plain GroupKFold by patient (deterministic); int: shuffled"
    )
    fold_stratify: Literal["wrist_angle"] | None = key(
        None,
        "null: GroupKFold by patient; wrist_angle: StratifiedGroupKFold by patient on the"
        " binned wrist angle (|angle| <10, 10-20, >=20 degrees; docs/pipeline.md)",
    )
    exclude: list[str] = key([], "training images with known annotation errors")
    soft_targets: bool = key(True, "fractional pixel coverage as targets (data/rasterize.py)")
    soft_k: int = key(
        4,
        "sub-samples per pixel side for soft targets (1..15)",
        check=lambda v: 1 <= v <= 15,
        want="must be in 1..15",
    )
    num_workers: int = key(
        8, "DataLoader processes", check=lambda v: v >= 0, want="must be >= 0", resume=True
    )
    on_bad_image: Literal["error", "skip"] = key(
        "error",
        "a training PNG/JSON that cannot be used (undecodable, bad JSON, points outside the"
        " PNG): error stops the cache build naming it; skip leaves it out with a warning",
    )
    crop: Literal["carpal"] | None = key(
        None,
        "null: whole images; carpal: train on the carpal box (a crop experiment for"
        " infer.crop; cache train_<size>_carpal-m<margin>)",
    )
    crop_margin: float = key(
        0.25,
        "the carpals' box made square and grown by this share per side",
        check=lambda v: 0 <= v <= 2,
        want="must be in [0, 2] (share of the box per side)",
    )
    crop_jitter: float = key(
        0.05,
        "training: random shift/scale of the crop box (share of its side)",
        check=lambda v: 0 <= v < 0.5,
        want="must be in [0, 0.5)",
    )
    patch_size: int | None = key(
        None,
        "null: train on the whole data.image_size image; int: on random squares of this"
        " side cut from it (a multiple of 32, <= data.image_size), validated and predicted"
        " with Gaussian windows of it (infer.overlap)",
        check=_positive_multiple_of_32,
        want=MULTIPLE_OF_32 + " or null",
    )
    patch_foreground: float = key(
        0.33,
        "patch training: share of patches centred on a bone (data.patch_balance); the rest"
        " are placed uniformly",
        check=lambda v: 0 <= v <= 1,
        want="must be in [0, 1]",
    )
    patch_balance: Literal["area", "uniform"] = key(
        "area",
        "patch training: which bone a centred patch is on; area: weight 1/sqrt(mean area)"
        " (small bones more often), uniform: every bone alike",
    )
    preprocess: list[str] = key(
        [],
        "fixed steps on every PNG at its source size, training cache and test images alike,"
        " kept in the checkpoint (inference uses each member's own): [] or [clahe]",
    )
    clahe_clip: float = key(
        2.0, "preprocess clahe: histogram clip limit", check=lambda v: v > 0, want="must be > 0"
    )
    clahe_grid: int = key(
        8,
        "preprocess clahe: tiles per side of the image",
        check=lambda v: 1 <= v <= 64,
        want="must be in 1..64",
    )
    augment: AugmentConfig = section(
        AugmentConfig, "training only (albumentations); probabilities in [0, 1]"
    )


@dataclass
class ModelConfig:
    arch: str = key(
        "unet",
        "fcn32s, fcn16s, fcn8s, unet, unetplusplus, deeplabv3, deeplabv3plus, any smp arch, or"
        " one registered with bonecomp.models.register_arch (docs/extending.md)",
    )
    encoder: str = key("resnet34", "an smp encoder name or tu-<any timm model>")
    encoder_weights: str | None = key(
        "imagenet", "needs the network once; null = from scratch; or a path"
    )
    fcn_upsample: Literal["bilinear", "learned"] = key("bilinear", "FCN heads: bilinear or learned")
    init_bias: float | None = key(-4.0, "output bias at the foreground prior: fast, stable start")


@dataclass
class LossConfig:
    # The weights' rule (>= 0, one > 0) and the term names: losses.check_loss_config.
    terms: dict[str, float] = key(
        {"bce": 0.5, "dice": 0.5},
        "weighted sum; terms: bce, dice, focal, jaccard, lovasz, tversky, or one registered"
        " with bonecomp.losses.register_loss (docs/extending.md)",
    )
    dice_smooth: float = key(
        1.0,
        "dice: smoothing added to numerator and denominator",
        check=lambda v: v >= 0,
        want="must be >= 0",
    )
    dice_over_batch: bool = key(
        True, "dice: per class over the whole batch (stable if a batch lacks one)"
    )
    focal_gamma: float = key(
        2.0, "focal: focusing exponent", check=lambda v: v >= 0, want="must be >= 0"
    )
    tversky_alpha: float = key(
        0.3, "tversky: weight of false positives", check=lambda v: v >= 0, want="must be >= 0"
    )
    tversky_beta: float = key(
        0.7,
        "tversky: weight of false negatives (thin tips are missed first)",
        check=lambda v: v >= 0,
        want="must be >= 0",
    )


@dataclass
class AverageConfig:
    """Checkpoint averaging: ``averaged.pt``, the mean of the chosen epochs' weights (both
    keys: the union of their epochs), validated like ``best.pt``."""

    last: int | None = key(
        None,
        "mean of the last k epochs' weights (k files in average_pool/)",
        check=lambda v: v >= 1,
        want="must be >= 1 or null",
    )
    best: int | None = key(
        None,
        "and/or of the k best validations' (k files too)",
        check=lambda v: v >= 1,
        want="must be >= 1 or null",
    )


# train.pseudo_weight's ceiling: an epoch draws weight x the pseudo images (its order is
# held in memory), so 1e9 would be an endless epoch, not a stronger pseudo signal.
PSEUDO_WEIGHT_MAX = 10

Scheduler = Literal["cosine", "poly", "step", "plateau", "constant", "none"]
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)  # the names, for optim and tests


@dataclass
class TrainConfig:
    experiment: str = key(
        "default",
        "runs/<experiment>/fold<k>/",
        check=_name,
        want="must be a non-empty name without '/'",
        resume=True,
    )
    output_dir: str = key("runs", "folder of the experiments' run folders", resume=True)
    epochs: int = key(
        40, "passes over the fold's training images", check=lambda v: v >= 1, want="must be >= 1"
    )
    batch_size: int = key(8, "per GPU", check=lambda v: v >= 1, want="must be >= 1")
    optimizer: str = key("adamw", "any timm optimizer: adamw, sgd, lion, lamb, ...")
    lr: float = key(
        1e-3, "peak learning rate (after the warm-up)", check=lambda v: v > 0, want="must be > 0"
    )
    weight_decay: float = key(
        1e-4,
        "of every parameter, biases and norms included",
        check=lambda v: v >= 0,
        want="must be >= 0",
    )
    momentum: float = key(
        0.9,
        "optimizers with momentum only (sgd, ...)",
        check=lambda v: 0 <= v < 1,
        want="must be in [0, 1)",
    )
    scheduler: Scheduler = key(
        "cosine",
        "cosine, poly, step, plateau (on val Dice), constant, none (flat lr, no warm-up)",
    )
    warmup_epochs: float = key(
        1.0,
        "linear warm-up per update from min_lr (may be fractional)",
        check=lambda v: v >= 0,
        want="must be >= 0",
    )
    min_lr: float | None = key(
        None,
        "floor of the schedule and start of the warm-up; null = lr / 100",
        check=lambda v: v >= 0,
        want="must be >= 0 or null",
    )
    decay_epochs: float = key(
        10.0, "step: epochs between decays", check=lambda v: v > 0, want="must be > 0"
    )
    decay_rate: float = key(
        0.1,
        "step, plateau: lr factor at each decay",
        check=lambda v: 0 < v <= 1,
        want="must be in (0, 1]",
    )
    patience_epochs: int = key(
        5,
        "plateau: validations without a better Dice before a decay",
        check=lambda v: v >= 0,
        want="must be >= 0",
    )
    poly_power: float = key(
        0.9, "poly: exponent of the decay", check=lambda v: v > 0, want="must be > 0"
    )
    grad_clip: float | None = key(
        1.0, "max gradient norm; null = none", check=lambda v: v > 0, want="must be > 0 or null"
    )
    accum_steps: int = key(
        1,
        "batches per update (effective batch = batch_size x accum_steps)",
        check=lambda v: v >= 1,
        want="must be >= 1",
    )
    amp: bool = key(True, "CUDA only: bf16 where supported, else fp16 with a grad scaler")
    channels_last: bool | Literal["auto"] = key(
        "auto",
        "auto: CUDA only (on CPU the demo model ran at 0.77x); true; false",
        resume=True,
    )
    ema: float | None = key(
        None,
        "EMA decay of weights, e.g. 0.999",
        check=lambda v: 0 < v < 1,
        want="must be in (0, 1) or null",
    )
    average: AverageConfig = section(
        AverageConfig,
        "averaged.pt: k epochs' weights averaged, BatchNorm statistics recomputed; null ="
        ' off (docs/pipeline.md "Checkpoint averaging")',
    )
    seed: int = key(42, "seed of the initial weights, the data order and the augmentations")
    init_from: str | None = key(
        None,
        "a checkpoint (best.pt of another run) whose weights start this run, not its"
        " optimiser or schedule: progressive resizing; same arch, encoder and classes",
        check=bool,
        want="must name a checkpoint file or be null",
    )
    val_every: int = key(
        1,
        "validate every n epochs (and after the last)",
        check=lambda v: v >= 1,
        want="must be >= 1",
    )
    device: str = key(
        "auto", "auto, cpu, cuda, cuda:1", check=DEVICE.fullmatch, want=DEVICE_WANT, resume=True
    )
    dist_timeout: float = key(
        300.0,
        "torchrun: seconds a rank waits for every rank to join at MASTER_ADDR:MASTER_PORT,"
        " then stops in one line (collectives keep torch's own timeouts)",
        check=lambda v: v > 0,
        want="must be > 0 (seconds)",
        resume=True,
    )
    max_train_minutes: float | None = key(
        None,
        "time budget: the LR schedule follows the time as well as the epochs, reaching "
        "its floor at the budget's end; then validate, save and stop",
        check=lambda v: v > 0,
        want="must be > 0 or null",
        resume=True,
    )
    expect_dice: float | None = key(
        None,
        "the validation Dice this recipe should reach: a fold cut by max_train_minutes "
        "below it gets a warning saying what to do",
        check=lambda v: 0 < v <= 1,
        want="must be in (0, 1] or null",
        resume=True,
    )
    save_oof: bool = key(True, "out-of-fold probabilities for threshold tuning")
    oof_size: int = key(
        256, "side of the saved out-of-fold maps", check=lambda v: v >= 1, want="must be >= 1"
    )
    trackers: list[str] = key(
        [],
        "experiment trackers, any of tensorboard, wandb, mlflow: config, summary.csv per"
        ' epoch, per-class Dice, report (pip install -e ".[track]"; README "Experiment'
        ' trackers")',
        resume=True,
    )
    micro_batch: int | Literal["auto"] | None = key(
        None,
        "images per forward: null = batch_size; n; auto = probe the GPU",
        check=lambda v: v == "auto" or v >= 1,
        want="must be >= 1, auto or null",
        resume=True,
    )
    memory_fraction: float = key(
        0.85,
        "auto: largest micro-batch whose peak stays under this share",
        check=lambda v: 0 < v <= 1,
        want="must be in (0, 1]",
        resume=True,
    )
    compile: bool = key(False, "torch.compile the training model (off until measured)", resume=True)
    report: bool = key(True, "scripts/train.py refreshes runs/<experiment>/report.html per fold")
    pseudo_labels: str | None = key(
        None,
        "folder from scripts/pseudo_label.py: its test images join every fold's training"
        " part (never validation)",
        check=bool,
        want="must name a folder or be null",
    )
    pseudo_weight: float = key(
        1.0,
        "pseudo samples per epoch = weight x pseudo images (1.0: each once, like a real"
        " image; 0.5: a random half)",
        check=lambda v: 0 < v <= PSEUDO_WEIGHT_MAX,
        want=f"must be in (0, {PSEUDO_WEIGHT_MAX}]: each pseudo image is drawn about weight"
        " times per epoch (1.0: once, as a real image is; more than"
        f" {PSEUDO_WEIGHT_MAX} would drown the real images and hold the epoch's order in"
        " memory)",
    )
    pseudo_rule: Literal["soft", "sharpen"] = key(
        "soft",
        "soft: the ensemble's probability is the target; sharpen: confident pixels snapped"
        " to 0/1, the rest kept soft",
    )
    pseudo_confidence: float = key(
        0.9,
        "sharpen: p >= this -> 1, p <= 1 - this -> 0 (in (0.5, 1])",
        check=lambda v: 0.5 < v <= 1,
        want="must be in (0.5, 1]",
    )


@dataclass
class EnsembleMember:
    """One entry of ``infer.ensemble``: folds of one experiment (listed once)."""

    experiment: str = key(
        "",
        "train.experiment of the member's runs",
        check=bool,
        want="must name an experiment (train.experiment of its runs)",
    )
    folds: list[int] = key(
        [0, 1, 2, 3, 4], "its folds, each once", check=bool, want="must list at least one fold"
    )
    weight: float = key(
        1.0, "its share of the ensemble's average", check=lambda v: v > 0, want="must be > 0"
    )
    checkpoint: str = key(
        "best", "best, last, averaged, or a checkpoint file name in the fold folder"
    )


@dataclass
class CarpalStageConfig:
    """Second stage: a crop experiment re-predicts the carpals inside the box that the
    first stage's carpal pixels give (``inference.carpal_stage``)."""

    experiment: str | None = key(
        None,
        "a data.crop=carpal experiment; null = no crop stage",
        check=_name,
        want="must be a name without '/' or null",
    )
    folds: list[int] = key([0, 1, 2, 3, 4], "the crop experiment's folds, each once")
    checkpoint: str = key(
        "best", "best, last, averaged, or a checkpoint file name in the fold folder"
    )
    weight: float | list[float] = key(
        1.0,
        "crop's share of the carpal probabilities in the box (or 8 values)",
        check=lambda v: (
            all(0 <= w <= 1 for w in ([v] if isinstance(v, float) else v))
            and (isinstance(v, float) or len(v) == 8)
        ),
        want="must be one share in [0, 1] or 8 (one per carpal, classes.CARPALS order)",
    )
    margin: float | None = key(
        None,
        "box margin; null = data.crop_margin of the crop checkpoint",
        check=lambda v: 0 <= v <= 2,
        want="must be in [0, 2] (share of the box per side) or null",
    )
    threshold: float = key(
        0.5,
        "first-stage carpal probability that marks the box",
        check=lambda v: 0 < v < 1,
        want="must be in (0, 1)",
    )


@dataclass
class InferConfig:
    name: str = key(
        "submission",
        "submissions/<name>_<timestamp>.csv",
        check=bool,
        want="must be a non-empty name",
    )
    out_dir: str = key("submissions", "folder of the submission CSVs")
    device: str = key("auto", "auto, cpu, cuda, cuda:1", check=DEVICE.fullmatch, want=DEVICE_WANT)
    amp: bool = key(True, "CUDA only: bf16 where supported, else fp16")
    tta: list[str] = key(
        ["none", "hflip"],
        "none, hflip, vflip, hvflip, rot90, transpose, or one registered with"
        " bonecomp.inference.tta.register_view (docs/extending.md)",
        check=bool,
        want="must be a non-empty list",
    )
    scales: list[float] = key(
        [1.0],
        "TTA scale factors",
        check=lambda v: bool(v) and all(s > 0 for s in v),
        want="must be a non-empty list of > 0",
    )
    sliding_window: bool = key(False, "predict in overlapping infer.tile tiles (Gaussian-weighted)")
    tile: int = key(
        1024,
        "sliding-window tile side (a multiple of 32)",
        check=_positive_multiple_of_32,
        want=MULTIPLE_OF_32,
    )
    overlap: float = key(
        0.25,
        "sliding-window overlap, in [0, 1)",
        check=lambda v: 0 <= v < 1,
        want="must be in [0, 1)",
    )
    batch_size: int = key(4, "images per forward", check=lambda v: v >= 1, want="must be >= 1")
    thresholds: str | None = key(
        None, "thresholds file; null = runs/thresholds_<name>.json when present"
    )
    threshold: float = key(
        0.5,
        "per-class default, in (0, 1)",
        check=lambda v: 0 < v < 1,
        want="must be in (0, 1)",
    )
    num_workers: int = key(4, "DataLoader processes", check=lambda v: v >= 0, want="must be >= 0")
    ensemble: list[EnsembleMember] = key(
        [],
        "[{experiment: NAME, folds: [0, 1, 2, 3, 4], weight: 1.0, checkpoint: best}];"
        " [] = every trained fold of train.experiment",
    )
    compile: bool = key(False, "torch.compile each ensemble member")
    crop: CarpalStageConfig = section(
        CarpalStageConfig, 'second stage on the carpal box (docs/pipeline.md "Carpal crop")'
    )


@dataclass
class Config:
    extensions: list[str] = key(
        [],
        "your modules with register_loss / register_view / register_arch / register_metric"
        " calls, imported before the config check: dotted names or .py files"
        " (docs/extending.md)",
        resume=True,
    )
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    loss: LossConfig = section(LossConfig)
    train: TrainConfig = section(TrainConfig)
    # Inference settings do not change what a training run computes: --resume may.
    infer: InferConfig = section(InferConfig, resume=True)


# Keys that were renamed: a file that still uses one gets the new form in the error.
MOVED = {
    "loss.bce_weight": "loss.terms (e.g. `loss: {terms: {bce: 0.5, dice: 0.5}}`)",
    "loss.dice_weight": "loss.terms (e.g. `loss: {terms: {bce: 0.5, dice: 0.5}}`)",
    "train.tensorboard": "train.trackers (e.g. `train: {trackers: [tensorboard]}`)",
    "train.wandb": "train.trackers (e.g. `train: {trackers: [wandb]}`)",
}


class Sources(dict):
    """Where each dotted key's value came from: a YAML file or ``"command line"``."""

    def __init__(self, default: str = "default") -> None:
        super().__init__()
        self.default = default

    def of(self, key: str) -> str:
        """The source of ``key`` or of the closest enclosing key that has one."""
        cuts = [m.start() for m in re.finditer(r"[.\[]", key)]
        for end in [len(key), *reversed(cuts)]:
            if key[:end] in self:
                return self[key[:end]]
        return self.default

    def set(self, key: str, source: str) -> None:
        for k in [k for k in self if k.startswith((f"{key}.", f"{key}["))]:
            del self[k]  # a replaced value takes its parts' source with it
        self[key] = source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (following ``extends``), apply ``key.sub=value`` overrides, and
    check every value's type and range (see ``check_values``)."""
    sources = Sources()
    raw: dict[str, Any] = _read_yaml_chain(Path(path), sources) if path else {}
    for item in overrides or []:
        _apply_override(raw, item, sources)
    cfg = from_dict(Config, raw, where=sources)
    # a .py extension is kept as an absolute path: the run's saved config (read again at
    # inference, maybe from another folder) must find the same file
    cfg.extensions = [str(Path(e).expanduser().resolve()) if e.endswith(".py") else e
                      for e in cfg.extensions]  # fmt: skip
    cfg._sources = sources  # type: ignore[attr-defined]  # read by source_of()
    check_values(cfg)
    return cfg


def config_from_saved(raw: dict[str, Any], where: str) -> Config:
    """A config saved with a checkpoint or run folder, also by an older version: renamed
    keys are migrated (a user's YAML gets an error instead, see ``MOVED``)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    loss = raw.get("loss")
    if isinstance(loss, dict) and ({"bce_weight", "dice_weight"} & set(loss)):
        bce, dice = loss.pop("bce_weight", 0.5), loss.pop("dice_weight", 0.5)
        loss.setdefault("terms", {k: w for k, w in (("bce", bce), ("dice", dice)) if w})
    train = raw.get("train")
    if isinstance(train, dict) and ({"tensorboard", "wandb"} & set(train)):
        old = [name for name in ("tensorboard", "wandb") if train.pop(name, False)]
        train.setdefault("trackers", old)
    return from_dict(Config, raw, where=where)


def source_of(cfg: Config, key: str) -> str:
    """Where the value of dotted ``key`` came from (a file, "command line" or "default")."""
    sources = getattr(cfg, "_sources", None)
    return sources.of(key) if sources is not None else "config"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for saving the resolved config and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml_chain(path: Path, sources: Sources, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loop through {[str(p) for p in seen]}")
    doc = _load_yaml(path)
    parent = doc.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(
            f"{path}: extends must name one file (e.g. `extends: base.yaml`), got "
            f"{_short(parent)}; a recipe has one parent, which may itself extend another"
        )
    base = {} if parent is None else _read_yaml_chain(path.parent / parent, sources, (*seen, path))
    for key in _leaf_keys(doc, Config):
        sources.set(key, str(path))
    return _merge(base, doc, Config)


class _Duplicate(yaml.YAMLError):
    """A key given twice in one mapping of a recipe."""


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice in one mapping is an error
    (yaml keeps the last silently: a second ``train:`` block would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges are meant to repeat
                continue
            k = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(k, typing.Hashable) and k in lines:
                raise _Duplicate(f"key {k!r} is given twice (lines {lines[k]} and {line})")
            lines[k] = line
        return super().construct_mapping(node, deep)


def _load_yaml(path: Path) -> dict[str, Any]:
    """One recipe file as a mapping; anything that is not one (missing, not UTF-8 text, a
    checkpoint given as ``--config``, invalid YAML, a key given twice, nested deeper than
    a config can be) is a ``ConfigError`` naming the file, in one line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if data[:4] == b"PK\x03\x04":
        raise ConfigError(
            f"{path}: not a YAML recipe but a zip archive (a checkpoint?); --config takes a "
            "recipe such as configs/demo.yaml (a checkpoint goes to --checkpoints or "
            "train.init_from)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "a recipe is YAML text: save it as UTF-8"
        ) from None
    try:
        doc = yaml.load(text, Loader=_RecipeLoader) or {}
    except _Duplicate as e:
        raise ConfigError(
            f"{path}: {e}; keep one (yaml would silently keep only the second)"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: nested too deep to be a recipe (a recipe nests a few levels)"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return doc


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_type(cls: Any, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls`` (None if it is a value, not a section)."""
    if not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    return tp if dataclasses.is_dataclass(tp) else None


def _leaf_keys(doc: dict[str, Any], cls: Any, prefix: str = "") -> Iterator[str]:
    for k, v in doc.items():
        sub = _section_type(cls, k)
        if sub is not None and isinstance(v, dict):
            yield from _leaf_keys(v, sub, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _merge(base: dict[str, Any], over: dict[str, Any], cls: Any) -> dict[str, Any]:
    """Sections merge key by key; values (lists, mappings like loss.terms) are replaced."""
    out = dict(base)
    for k, v in over.items():
        sub = _section_type(cls, k)
        mergeable = sub is not None and isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v, sub) if mergeable else v
    return out


def _apply_override(raw: dict[str, Any], item: str, sources: Sources) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value ({e})") from e
    sources.set(key, COMMAND_LINE)


def from_dict(cls: type, raw: Any, where: str | Sources = "config", key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    ``where`` names the source of every value (a file name), or maps each key to its own.
    """
    src = where if isinstance(where, Sources) else Sources(default=where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{src.of(key)}: {key or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    pre = f"{key}." if key else ""
    unknown = sorted(set(raw) - names)
    for u in unknown:
        if pre + u in MOVED:
            raise ConfigError(
                f"{src.of(pre + u)}: {pre + u} was replaced by {MOVED[pre + u]}", pre + u
            )
    if unknown:
        raise ConfigError(
            f"{src.of(pre + unknown[0])}: unknown key(s) {[pre + u for u in unknown]}; "
            f"valid: {sorted(names)}",
            pre + unknown[0],
        )
    kwargs = {n: _coerce(hints[n], v, src, pre + n) for n, v in raw.items()}
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, v: Any, src: Sources, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(a, v, src, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        want = " or ".join(_describe(a) for a in options)
        raise ConfigError(f"{src.of(key)}: {key} must be {want}, got {v!r}", key)
    if origin is Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        raise ConfigError(f"{src.of(key)}: {key} must be one of {list(args)}, got {v!r}", key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, src, key)
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{src.of(key)}: {key} must be a list, got {v!r}", key)
        return [_coerce(args[0], x, src, f"{key}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{src.of(key)}: {key} must be a mapping, got {v!r}", key)
        return {
            _coerce(args[0], k, src, key): _coerce(args[1], x, src, f"{key}.{k}")
            for k, x in v.items()
        }
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            pass
    if tp in (int, str, bool, float) and type(v) is tp:
        return v
    hint = _HINTS.get((key, v), "") if isinstance(v, str) else ""
    raise ConfigError(f"{src.of(key)}: {key} must be {_describe(tp)}, got {v!r}{hint}", key)


# Values users reach for by analogy with other tools, with where the feature lives here.
_HINTS = {
    ("train.batch_size", "auto"): (
        " (the effective batch stays a number; train.micro_batch=auto fits the batch per"
        " forward to GPU memory and accumulates the rest)"
    ),
}


# ----------------------------------------------------------------------------- values
def check_values(cfg: Config) -> None:
    """Raise ``ConfigError`` for the first value out of range; needs no registry.

    Each key's own ``check`` (and the finite-float rule), then the rules between keys.
    The message is one line: where the value came from, the key, what it must be.
    """
    for k, message in _value_problems(cfg):
        raise ConfigError(f"{source_of(cfg, k)}: {k} {message}", k)


def _values(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, KeyInfo]]:
    """(dotted key, value, declaration) of every key of ``obj``, sections and list
    entries (``infer.ensemble[0].weight``) included."""
    for f in dataclasses.fields(obj):
        k, v, info = prefix + f.name, getattr(obj, f.name), key_info(f)
        if dataclasses.is_dataclass(v):
            yield from _values(v, k + ".")
            continue
        yield k, v, info
        if isinstance(v, list):
            for i, x in enumerate(v):
                if dataclasses.is_dataclass(x):
                    yield from _values(x, f"{k}[{i}].")


def _non_finite(k: str, v: Any) -> tuple[str, float] | None:
    """The first inf/nan float in ``v`` (a float, or one inside a list or mapping)."""
    if isinstance(v, float):
        return None if math.isfinite(v) else (k, v)
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for sub, x in items:
        bad = _non_finite(f"{k}.{sub}" if isinstance(v, dict) else f"{k}[{sub}]", x)
        if bad:
            return bad
    return None


def _value_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    for k, v, info in _values(cfg):
        bad = _non_finite(k, v) if info.finite else None
        if bad:
            yield bad[0], f"must be a finite number, got {bad[1]!r}"
        elif info.check is not None and v is not None and not info.check(v):
            yield k, f"{info.want}, got {v!r}"
    yield from _cross_field_problems(cfg)


def _cross_field_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    """The rules that relate keys to each other, each worded once."""
    t = cfg.train
    if t.warmup_epochs > t.epochs:
        yield "train.warmup_epochs", f"must be <= train.epochs ({t.epochs}), got {t.warmup_epochs}"
    if t.min_lr is not None and t.min_lr > t.lr:
        yield "train.min_lr", f"must be <= train.lr ({t.lr}), got {t.min_lr}"
    if t.average.last is not None and t.average.last > t.epochs:
        yield (
            "train.average.last",
            f"must be <= train.epochs ({t.epochs}): there are only that many epochs to "
            f"average, got {t.average.last}",
        )
    n_val = validations(t.epochs, t.val_every)
    if t.average.best is not None and t.average.best > n_val:
        yield (
            "train.average.best",
            f"must be <= the {n_val} validation(s) of train.epochs={t.epochs} with "
            f"train.val_every={t.val_every}, got {t.average.best}; lower it or validate "
            "more often",
        )
    seen_tta: set[str] = set()
    for i, name in enumerate(cfg.infer.tta):
        if name in seen_tta:
            yield f"infer.tta[{i}]", f"lists {name!r} twice"
        seen_tta.add(name)
    crop = cfg.infer.crop
    if crop.experiment is not None:
        yield from _fold_problems("infer.crop.folds", crop.folds, cfg.data.n_splits)
    first: dict[str, int] = {}
    for i, m in enumerate(cfg.infer.ensemble):
        yield from _fold_problems(f"infer.ensemble[{i}].folds", m.folds, cfg.data.n_splits)
        # One entry per experiment: threshold tuning, class-wise weights and the OOF maps
        # are all kept per experiment, so a second entry would be merged or weighted twice.
        j = first.setdefault(m.experiment, i)
        if j != i:
            yield (
                f"infer.ensemble[{i}].experiment",
                f"{m.experiment!r} is listed more than once (also infer.ensemble[{j}]); "
                "list each experiment once, with all its folds",
            )


def validations(epochs: int, val_every: int) -> int:
    """How many validations a run of ``epochs`` has: every ``val_every``-th epoch and the
    last (``training.fold`` validates so)."""
    return epochs // val_every + (epochs % val_every != 0)


def _fold_problems(k: str, folds: list[int], n_splits: int) -> Iterator[tuple[str, str]]:
    if not folds or len(set(folds)) != len(folds):
        yield k, f"must list folds once each, got {folds}"
    bad = [f for f in folds if not 0 <= f < n_splits]
    if bad:
        yield k, f"must be in 0..{n_splits - 1} (data.n_splits), got {bad}"


# ----------------------------------------------------------------------------- resume
def resume_may_change(cls: type = Config, prefix: str = "") -> set[str]:
    """Dotted keys (or whole sections) declared ``resume=True``: ``--resume`` may change
    them (``training.state.check_resumable``)."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        info, k = key_info(f), prefix + f.name
        if info.resume:
            out.add(k)
        elif info.section:
            out |= resume_may_change(hints[f.name], k + ".")
    return out


# ----------------------------------------------------------------------------- base.yaml
BASE_YAML = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
_COMMENT_AT = 32  # column of the comments
_WIDTH = 100

_BASE_HEADER = """\
# Every knob of the pipeline with its default. GENERATED from the dataclasses in
# bonecomp/config.py by `make base-config` (python scripts/write_base_config.py): edit a
# key's default or doc there, never here (tests/test_config.py fails when this is stale).
# A recipe says `extends: base.yaml` and overrides what differs; any key can also be
# overridden on the command line (train.epochs=50). Sections merge key by key; a list or
# a mapping given by a recipe (loss.terms, infer.tta) replaces the whole value.
"""


def base_yaml(cls: type = Config) -> str:
    """The text of ``configs/base.yaml``: every key of ``cls`` with its default and its
    doc as a comment, sections nested (see ``scripts/write_base_config.py``)."""
    return _BASE_HEADER + "".join(line + "\n" for line in _yaml_lines(cls, 0))


def _yaml_lines(cls: type, depth: int) -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        info, pad = key_info(f), "  " * depth
        if info.section:
            yield from _commented(f"{pad}{f.name}:", info.doc)
            yield from _yaml_lines(hints[f.name], depth + 1)
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield from _commented(f"{pad}{f.name}: {_yaml_value(default)}", info.doc)


def _commented(left: str, doc: str) -> Iterator[str]:
    if not doc:
        yield left
        return
    col = max(_COMMENT_AT, len(left) + 2)
    parts = textwrap.wrap(doc, _WIDTH - col - 2, break_long_words=False, break_on_hyphens=False)
    yield f"{left.ljust(col)}# {parts[0]}"
    for part in parts[1:]:
        yield f"{' ' * col}# {part}"


def _yaml_value(v: Any) -> str:
    """``v`` in YAML flow style; floats as PyYAML reads them back (``1.0e-3``)."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return ".nan" if math.isnan(v) else ".inf" if v > 0 else "-.inf"
        if v == 0 or (abs(v) >= 1e-2 and "e" not in repr(v)):
            return repr(v)
        for digits in range(1, 18):  # the shortest mantissa that reads back exactly
            mantissa, exp = f"{v:.{digits}e}".split("e")
            if float(f"{mantissa}e{exp}") == v:
                break
        return f"{mantissa}e{int(exp):+d}"  # 1.0e-3: PyYAML reads 1e-3 as a string
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_yaml_value(k)}: {_yaml_value(x)}" for k, x in v.items()) + "}"
    return yaml.safe_dump(v, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def write_base_yaml(path: Path = BASE_YAML) -> bool:
    """Write ``base_yaml()`` to ``path``; False when it was already up to date."""
    text = base_yaml()
    if path.is_file() and path.read_text() == text:
        return False
    write_text(path, text)
    return True
