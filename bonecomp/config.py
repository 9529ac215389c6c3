"""Experiment configuration: YAML files -> typed pydantic models, with dotted CLI overrides.

Every key is declared once, as a field of a section model: its type, default and range
(pydantic constraints: ``ge``, ``lt``, ``multiple_of``, ``pattern``), its one-line doc (the
docstring under it) and, in ``json_schema_extra``, whether ``--resume`` may change it
(``RESUME``) and, where its constraints do not say it in words, how its error reads
(``want(...)``). From those come the checks, ``configs/base.yaml`` and
``configs/schema.json`` (``make base-config``; a test fails when either is stale) and
``resume_may_change``. A new key is ``warmup_frac: float = Field(0.1, ge=0, lt=1)``, a
docstring under it, and the code that reads it. Rules between keys (warm-up <= epochs,
folds < data.n_splits, ...) are in ``_cross_field_problems``, each worded once; names that
need a registry (architecture, loss terms, TTA...) in ``bonecomp.checks.check_config``.

A recipe YAML may name a parent with ``extends: base.yaml`` (path relative to the file);
sections merge key by key, any value (a list, or a mapping such as ``loss.terms``) is
replaced. Unknown keys, wrong types, non-finite floats and values out of range are errors
on one line that name the key and where its value came from (the YAML file, or "command
line"), so a typo never silently falls back to a default.

Why pydantic 2 (a declared dependency; albumentations needs it anyway): strict typed
parsing (``true`` is not an int, a string is not a float but PyYAML's ``3e-4``), ranges,
the non-finite refusal and the JSON Schema editors use come from field constraints instead
of our own coercer, checks and key metadata. What pydantic does not know stays ours: the
YAML chain and overrides with each value's source, the one-line error (``_problem`` turns a
``ValidationError`` into ``<source>: <key> <what it must be>, got <value>``), renamed keys
(``MOVED``), the rules between keys, the resume flags and the base.yaml writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo

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
RESUME = {"resume": True}  # json_schema_extra of a key that --resume may change


def want(words: str, resume: bool = False) -> dict[str, Any]:
    """``json_schema_extra`` of a key whose error reads ``must <words>``, where the words
    of its constraints would not say it (a pattern, a share of what), and its ``resume``."""
    return {"want": f"must {words}", **(RESUME if resume else {})}


class Section(BaseModel):
    """A config section: strict types, no unknown keys, finite floats (a key may say
    ``allow_inf_nan=True``), each key's doc is the docstring under it. Assigning to a key
    does not validate; ``check_values`` does."""

    model_config = ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        for name, f in cls.model_fields.items():  # at import: a regex is not an error message
            if _extra(f, "want") is None and "pattern" in _constraints(f):
                raise TypeError(f"{cls.__name__}.{name}: a pattern needs its want(...) words")

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_floats(cls, v: Any, info: Any) -> Any:
        """PyYAML reads ``3e-4`` (no dot) as a string: where a float goes, it is one."""
        return _floats(cls.model_fields[info.field_name].annotation, v)


def _floats(tp: Any, v: Any) -> Any:
    opts = _options(tp)
    if isinstance(v, str) and float in opts:
        with contextlib.suppress(ValueError):
            return float(v)
    for o in opts:
        if isinstance(v, list) and typing.get_origin(o) is list:
            return [_floats(typing.get_args(o)[0], x) for x in v]
        if isinstance(v, dict) and typing.get_origin(o) is dict:
            return {k: _floats(typing.get_args(o)[1], x) for k, x in v.items()}
    return v


def _options(tp: Any) -> list[Any]:
    """The types a value of ``tp`` may have: unions flattened, ``Annotated`` and None dropped."""
    if typing.get_origin(tp) is Annotated:
        return _options(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [o for a in typing.get_args(tp) for o in _options(a)]
    return [] if tp is type(None) else [tp]


def _section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _extra(f: FieldInfo, name: str) -> Any:
    return f.json_schema_extra.get(name) if isinstance(f.json_schema_extra, dict) else None


def _constraints(f: FieldInfo) -> dict[str, Any]:
    bounds = ("ge", "gt", "le", "lt", "multiple_of", "min_length", "pattern")
    return {a: getattr(m, a) for m in f.metadata for a in bounds if getattr(m, a, None) is not None}


Prob = Annotated[float, Field(ge=0, le=1, json_schema_extra=want("be a probability in [0, 1]"))]
Share = Annotated[float, Field(ge=0, le=1)]
SHARE = "be in [0, 2] (share of the box per side)"
DEVICE = r"^(auto|cpu|mps|cuda(:\d+)?)$"
Device = Annotated[
    str, Field(pattern=DEVICE, json_schema_extra=want("be auto, cpu, mps, cuda or cuda:<index>"))
]
NAME = r"^[^/]+$"  # a name without '/'

# Closed choices (not extension points): the Literal is their one list; code that needs
# the names as a tuple takes ``typing.get_args`` of it. Names a user may register (fold
# stratifiers, preprocessing steps, trackers, clean-up rules, architectures, loss terms,
# TTA views) are plain strings here, checked against their registry by bonecomp.checks.
OnBadImage = Literal["error", "skip"]
PatchBalance = Literal["area", "uniform"]
FcnUpsample = Literal["bilinear", "learned"]
PseudoRule = Literal["soft", "sharpen"]


AUGMENT_NAME = "__class_fullname__"  # albumentations' key for a transform's class


def augment_from_preset(old: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``data.augment`` list that trains as the preset of earlier versions (a mapping:
    hflip, vflip, shift, scale, rotate, affine_p, brightness_contrast(_p), clahe_p) did,
    random stream included (a transform of p 0 draws nothing, so it is left out)."""
    p = {"hflip": 0.5, "vflip": 0.0, "shift": 0.06, "scale": 0.1, "rotate": 20.0,
         "affine_p": 0.7, "brightness_contrast": 0.2, "brightness_contrast_p": 0.5,
         "clahe_p": 0.0} | old  # fmt: skip
    bc = p["brightness_contrast"]
    # fmt: off
    entries = [
        {AUGMENT_NAME: "HorizontalFlip", "p": p["hflip"]},
        {AUGMENT_NAME: "VerticalFlip", "p": p["vflip"]},
        {AUGMENT_NAME: "Affine", "translate_percent": [-p["shift"], p["shift"]],
         "scale": [1 - p["scale"], 1 + p["scale"]], "rotate": [-p["rotate"], p["rotate"]],
         "interpolation": 1, "mask_interpolation": 1, "border_mode": 0, "fill": 0,
         "p": p["affine_p"]},
        {AUGMENT_NAME: "RandomBrightnessContrast", "brightness_limit": bc, "contrast_limit": bc,
         "p": p["brightness_contrast_p"]},
        {AUGMENT_NAME: "CLAHE", "p": p["clahe_p"]},
    ]
    # fmt: on
    return [e for e in entries if e["p"] > 0]


class DataConfig(Section):
    root: str = Field("data/competition", json_schema_extra=RESUME)
    """docs/format.md layout: train/DCM, train/outputs_json, test/DCM"""
    image_size: int = Field(512, gt=0, multiple_of=32)
    """square training size, a multiple of 32; the cache is built at it"""
    cache_dir: str = Field("cache", json_schema_extra=RESUME)
    """training cache and folds file per data root, built once"""
    n_splits: int = Field(5, ge=2)
    """GroupKFold by patient folder (>= 2)"""
    fold_seed: int | None = None
    """null: plain GroupKFold by patient (deterministic); int: shuffled"""
    fold_stratify: str | None = None
    """null: GroupKFold by patient; wrist_angle: StratifiedGroupKFold by patient on the binned wrist
    angle (|angle| <10, 10-20, >=20 degrees; docs/pipeline.md), or a rule registered with
    bonecomp.data.folds.register_stratifier (docs/extending.md)"""
    exclude: list[str] = []
    """training images with known annotation errors"""
    soft_targets: bool = True
    """fractional pixel coverage as targets (data/rasterize.py)"""
    soft_k: int = Field(4, ge=1, le=15)
    """sub-samples per pixel side for soft targets (1..15)"""
    num_workers: int = Field(8, ge=0, json_schema_extra=RESUME)
    """DataLoader processes"""
    on_bad_image: OnBadImage = "error"
    """a training PNG/JSON that cannot be used (undecodable, bad JSON, points outside the PNG):
    error stops the cache build naming it; skip leaves it out with a warning"""
    crop: Literal["carpal"] | None = None
    """null: whole images; carpal: train on the carpal box (a crop experiment for infer.crop; cache
    train_<size>_carpal-m<margin>)"""
    crop_margin: float = Field(0.25, ge=0, le=2, json_schema_extra=want(SHARE))
    """the carpals' box made square and grown by this share per side"""
    crop_jitter: float = Field(0.05, ge=0, lt=0.5)
    """training: random shift/scale of the crop box (share of its side)"""
    patch_size: int | None = Field(None, gt=0, multiple_of=32)
    """null: train on the whole data.image_size image; int: on random squares of this side cut from
    it (a multiple of 32, <= data.image_size), validated and predicted with Gaussian windows of
    it (train.val_overlap, infer.overlap)"""
    patch_foreground: float = Field(0.33, ge=0, le=1)
    """patch training: share of patches centred on a bone (data.patch_balance); the rest are placed
    uniformly"""
    patch_balance: PatchBalance = "area"
    """patch training: which bone a centred patch is on; area: weight 1/sqrt(mean area) (small bones
    more often), uniform: every bone alike"""
    preprocess: list[str] = []
    """fixed steps on every PNG at its source size, training cache and test images alike, kept in
    the checkpoint (inference uses each member's own): [], [clahe], or steps registered with
    bonecomp.data.preprocess.register_preprocess (docs/extending.md)"""
    clahe_clip: float = Field(2.0, gt=0)
    """preprocess clahe: histogram clip limit"""
    clahe_grid: int = Field(8, ge=1, le=64)
    """preprocess clahe: tiles per side of the image"""
    augment: list[dict[str, Any]] = Field(default_factory=lambda: augment_from_preset({}))
    """training only: albumentations transforms in their to_dict form, applied in order
    (docs/techniques.md#augmentation); [] for none"""

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_is_a_list(cls, v: Any) -> Any:
        if isinstance(v, dict):
            raise ValueError(
                "is now a list of albumentations transforms (e.g. [{__class_fullname__: "
                "HorizontalFlip, p: 0.5}]); the old preset's keys are entries of configs/base.yaml"
            )
        return v


class ModelConfig(Section):
    arch: str = "unet"
    """fcn32s, fcn16s, fcn8s, unet, unetplusplus, deeplabv3, deeplabv3plus, any smp arch, or one
    registered with bonecomp.models.register_arch (docs/extending.md)"""
    encoder: str = "resnet34"
    """an smp encoder name or tu-<any timm model>"""
    encoder_weights: str | None = "imagenet"
    """needs the network once; null = from scratch; or a path"""
    fcn_upsample: FcnUpsample = "bilinear"
    """FCN heads: bilinear or learned"""
    init_bias: float | None = -4.0
    """output bias at the foreground prior: fast, stable start"""


class LossConfig(Section):
    # The weights' rule (>= 0, one > 0) and the term names: losses.check_loss_config.
    terms: dict[str, float] = {"bce": 0.5, "dice": 0.5}
    """weighted sum; terms: bce, dice, focal, jaccard, lovasz, tversky, or one registered with
    bonecomp.losses.register_loss (docs/extending.md)"""
    dice_smooth: float = Field(1.0, ge=0)
    """dice: smoothing added to numerator and denominator"""
    dice_over_batch: bool = True
    """dice: per class over the whole batch (stable if a batch lacks one)"""
    focal_gamma: float = Field(2.0, ge=0)
    """focal: focusing exponent"""
    tversky_alpha: float = Field(0.3, ge=0)
    """tversky: weight of false positives"""
    tversky_beta: float = Field(0.7, ge=0)
    """tversky: weight of false negatives (thin tips are missed first)"""


class AverageConfig(Section):
    """Checkpoint averaging: ``averaged.pt``, the mean of the chosen epochs' weights (both keys: the
    union of their epochs), validated like ``best.pt``."""

    last: int | None = Field(None, ge=1)
    """mean of the last k epochs' weights (k files in average_pool/)"""
    best: int | None = Field(None, ge=1)
    """and/or of the k best validations' (k files too)"""


# train.pseudo_weight's ceiling: an epoch draws weight x the pseudo images (its order is
# held in memory), so 1e9 would be an endless epoch, not a stronger pseudo signal.
PSEUDO_WEIGHT_MAX = 10

Scheduler = Literal["cosine", "poly", "step", "plateau", "constant", "none"]
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)  # the names, for optim and tests


class TrainConfig(Section):
    experiment: str = Field(
        "default",
        pattern=NAME,
        json_schema_extra=want("be a non-empty name without '/'", resume=True),
    )
    """runs/<experiment>/fold<k>/"""
    output_dir: str = Field("runs", json_schema_extra=RESUME)
    """folder of the experiments' run folders"""
    epochs: int = Field(40, ge=1)
    """passes over the fold's training images"""
    batch_size: int = Field(8, ge=1)
    """per GPU"""
    optimizer: str = "adamw"
    """any timm optimizer: adamw, sgd, lion, lamb, ..."""
    lr: float = Field(1e-3, gt=0)
    """peak learning rate (after the warm-up)"""
    weight_decay: float = Field(1e-4, ge=0)
    """of every parameter, biases and norms included"""
    momentum: float = Field(0.9, ge=0, lt=1)
    """optimizers with momentum only (sgd, ...)"""
    scheduler: Scheduler = "cosine"
    """cosine, poly, step, plateau (on val Dice), constant, none (flat lr, no warm-up)"""
    warmup_epochs: float = Field(1.0, ge=0)
    """linear warm-up per update from min_lr (may be fractional)"""
    min_lr: float | None = Field(None, ge=0)
    """floor of the schedule and start of the warm-up; null = lr / 100"""
    decay_epochs: float = Field(10.0, gt=0)
    """step: epochs between decays"""
    decay_rate: float = Field(0.1, gt=0, le=1)
    """step, plateau: lr factor at each decay"""
    patience_epochs: int = Field(5, ge=0)
    """plateau: validations without a better Dice before a decay"""
    poly_power: float = Field(0.9, gt=0)
    """poly: exponent of the decay"""
    grad_clip: float | None = Field(1.0, gt=0)
    """max gradient norm; null = none"""
    accum_steps: int = Field(1, ge=1)
    """batches per update (effective batch = batch_size x accum_steps)"""
    amp: bool = True
    """CUDA only: bf16 where supported, else fp16 with a grad scaler"""
    channels_last: bool | Literal["auto"] = Field("auto", json_schema_extra=RESUME)
    """auto: CUDA only (on CPU the demo model ran at 0.77x); true; false"""
    ema: float | None = Field(None, gt=0, lt=1)
    """EMA decay of weights, e.g. 0.999"""
    average: AverageConfig = Field(default_factory=AverageConfig)
    """averaged.pt: k epochs' weights averaged, BatchNorm statistics recomputed; null = off
    (docs/pipeline.md "Checkpoint averaging")"""
    seed: int = 42
    """seed of the initial weights, the data order and the augmentations"""
    init_from: str | None = Field(
        None, min_length=1, json_schema_extra=want("name a checkpoint file or be null")
    )
    """a checkpoint (best.pt of another run) whose weights start this run, not its optimiser or
    schedule: progressive resizing; same arch, encoder and classes"""
    val_every: int = Field(1, ge=1)
    """validate every n epochs (and after the last)"""
    val_overlap: float = Field(0.25, ge=0, lt=1)
    """patch runs: overlap of validation's windows, in [0, 1) (what picks best.pt: --resume keeps
    it; infer.overlap is inference's)"""
    device: Device = Field("auto", json_schema_extra=RESUME)
    """auto, cpu, cuda, cuda:1"""
    dist_timeout: float = Field(300.0, gt=0, json_schema_extra=want("be > 0 (seconds)", True))
    """torchrun: seconds a rank waits for every rank to join at MASTER_ADDR:MASTER_PORT, then stops
    in one line (collectives keep torch's own timeouts)"""
    max_train_minutes: float | None = Field(None, gt=0, json_schema_extra=RESUME)
    """time budget, a safety net: the LR schedule follows the updates while the projected finish
    fits; once it overruns, the clock takes over and anneals to the floor by the deadline; then
    validate, save and stop"""
    expect_dice: float | None = Field(None, gt=0, le=1, json_schema_extra=RESUME)
    """the validation Dice this recipe should reach: a fold cut by max_train_minutes below it gets a
    warning saying what to do"""
    save_oof: bool = True
    """out-of-fold probabilities for threshold tuning"""
    oof_size: int = Field(256, ge=1)
    """side of the saved out-of-fold maps"""
    trackers: list[str] = Field([], json_schema_extra=RESUME)
    """experiment trackers, any of tensorboard, wandb, mlflow (pip install -e ".[track]"; README
    "Experiment trackers") or one registered with bonecomp.trackers.register_tracker
    (docs/extending.md): config, summary.csv per epoch, per-class Dice, report"""
    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, json_schema_extra=want("be >= 1, auto or null", resume=True)
    )
    """images per forward: null = batch_size; n; auto = probe the GPU, from the computed plan"""
    memory_fraction: float = Field(0.85, gt=0, le=1, json_schema_extra=RESUME)
    """auto: largest micro-batch whose peak stays under this share"""
    compile: bool = Field(False, json_schema_extra=RESUME)
    """torch.compile the training model (off until measured)"""
    grad_checkpointing: bool = Field(False, json_schema_extra=RESUME)
    """recompute the encoder's and decoder's blocks in the backward pass: less activation memory
    for ~1 more forward of them per step, same gradients (scripts/doctor.py --plan shows both)"""
    report: bool = True
    """scripts/train.py refreshes runs/<experiment>/report.html per fold"""
    pseudo_labels: str | None = Field(
        None, min_length=1, json_schema_extra=want("name a folder or be null")
    )
    """folder from scripts/pseudo_label.py: its test images join every fold's training part (never
    validation)"""
    pseudo_weight: float = Field(
        1.0,
        gt=0,
        le=PSEUDO_WEIGHT_MAX,
        json_schema_extra=want(
            f"be in (0, {PSEUDO_WEIGHT_MAX}]: each pseudo image is drawn about weight times per"
            f" epoch (1.0: once, as a real image is; more than {PSEUDO_WEIGHT_MAX} would drown"
            " the real images and hold the epoch's order in memory)"
        ),
    )
    """pseudo samples per epoch = weight x pseudo images (1.0: each once, like a real image; 0.5: a
    random half)"""
    pseudo_rule: PseudoRule = "soft"
    """soft: the ensemble's probability is the target; sharpen: confident pixels snapped to 0/1, the
    rest kept soft"""
    pseudo_confidence: float = Field(0.9, gt=0.5, le=1)
    """sharpen: p >= this -> 1, p <= 1 - this -> 0 (in (0.5, 1])"""


class EnsembleMember(Section):
    """One entry of ``infer.ensemble``: folds of one experiment (listed once)."""

    experiment: str = Field(
        "",  # an entry must name it: its default is refused
        min_length=1,
        validate_default=True,
        json_schema_extra=want("name an experiment (train.experiment of its runs)"),
    )
    """train.experiment of the member's runs"""
    folds: list[int] = Field(
        [0, 1, 2, 3, 4], min_length=1, json_schema_extra=want("list at least one fold")
    )
    """its folds, each once"""
    weight: float = Field(1.0, gt=0)
    """its share of the ensemble's average"""
    checkpoint: str = "best"
    """best, last, averaged, or a checkpoint file name in the fold folder"""


class CarpalStageConfig(Section):
    """Second stage: a crop experiment re-predicts the carpals inside the box that the first stage's
    carpal pixels give (``inference.carpal_stage``)."""

    experiment: str | None = Field(
        None, pattern=NAME, json_schema_extra=want("be a name without '/' or null")
    )
    """a data.crop=carpal experiment; null = no crop stage"""
    folds: list[int] = [0, 1, 2, 3, 4]
    """the crop experiment's folds, each once"""
    checkpoint: str = "best"
    """best, last, averaged, or a checkpoint file name in the fold folder"""
    weight: Share | Annotated[list[Share], Field(min_length=8, max_length=8)] = Field(
        1.0,
        json_schema_extra=want(
            "be one share in [0, 1] or 8 (one per carpal, classes.CARPALS order)"
        ),
    )
    """crop's share of the carpal probabilities in the box (or 8 values)"""
    margin: float | None = Field(None, ge=0, le=2, json_schema_extra=want(SHARE + " or null"))
    """box margin; null = data.crop_margin of the crop checkpoint"""
    threshold: float = Field(0.5, gt=0, lt=1)
    """first-stage carpal probability that marks the box"""


class InferConfig(Section):
    name: str = Field("submission", min_length=1, json_schema_extra=want("be a non-empty name"))
    """submissions/<name>_<timestamp>.csv"""
    out_dir: str = "submissions"
    """folder of the submission CSVs"""
    device: Device = "auto"
    """auto, cpu, cuda, cuda:1"""
    amp: bool = True
    """CUDA only: bf16 where supported, else fp16"""
    tta: list[str] = Field(
        ["none", "hflip"], min_length=1, json_schema_extra=want("be a non-empty list")
    )
    """none, hflip, vflip, hvflip, rot90, transpose, or one registered with
    bonecomp.inference.tta.register_view (docs/extending.md)"""
    scales: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0], min_length=1, json_schema_extra=want("be a non-empty list of > 0")
    )
    """TTA scale factors"""
    sliding_window: bool = False
    """predict in overlapping infer.tile tiles (Gaussian-weighted)"""
    tile: int = Field(1024, gt=0, multiple_of=32)
    """sliding-window tile side (a multiple of 32)"""
    overlap: float = Field(0.25, ge=0, lt=1)
    """sliding-window overlap, in [0, 1)"""
    batch_size: int = Field(4, ge=1)
    """images per forward"""
    thresholds: str | None = None
    """thresholds file; null = runs/thresholds_<name>.json when present"""
    threshold: float = Field(0.5, gt=0, lt=1)
    """per-class default, in (0, 1)"""
    num_workers: int = Field(4, ge=0)
    """DataLoader processes"""
    ensemble: list[EnsembleMember] = []
    """[{experiment: NAME, folds: [0, 1, 2, 3, 4], weight: 1.0, checkpoint: best}]; [] = every
    trained fold of train.experiment"""
    compile: bool = False
    """torch.compile each ensemble member"""
    cleanup_rules: list[str] | None = Field(
        None, min_length=1, json_schema_extra=want("be a non-empty list or null")
    )
    """kinds of clean-up rule scripts/tune_cleanup.py tries: largest, min_area, fill_holes, or rules
    registered with bonecomp.inference.cleanup.register_cleanup (docs/extending.md); null =
    every registered one"""
    crop: CarpalStageConfig = Field(default_factory=CarpalStageConfig)
    """second stage on the carpal box (docs/pipeline.md "Carpal crop")"""


class Config(Section):
    extensions: list[str] = Field([], json_schema_extra=RESUME)
    """your modules with register_* calls (loss terms, TTA views, architectures, metrics, trackers,
    preprocessing steps, clean-up rules, fold stratifiers), imported before the config check:
    dotted names or .py files (docs/extending.md)"""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # Inference settings do not change what a training run computes: --resume may.
    infer: InferConfig = Field(default_factory=InferConfig, json_schema_extra=RESUME)
    _sources: Sources | None = PrivateAttr(None)  # where each value came from (source_of)

    def __eq__(self, other: object) -> bool:  # the values, not where they came from
        return type(other) is type(self) and self.__dict__ == other.__dict__


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
    cfg._sources = sources  # read by source_of()
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
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("augment"), dict):
        data["augment"] = augment_from_preset(data["augment"])
    return from_dict(Config, raw, where=where)


def source_of(cfg: Config, key: str) -> str:
    """Where the value of dotted ``key`` came from (a file, "command line" or "default")."""
    sources = getattr(cfg, "_sources", None)
    return sources.of(key) if sources is not None else "config"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for saving the resolved config and checkpoints)."""
    return cfg.model_dump()


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
    """The model type of field ``name`` of ``cls`` (None if it is a value, not a section)."""
    f = cls.model_fields.get(name) if _section(cls) else None
    return f.annotation if f is not None and _section(f.annotation) else None


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


def from_dict(cls: type[Section], raw: Any, where: str | Sources = "config") -> Any:
    """Build model ``cls`` from a mapping, checking every key, type and range.

    ``where`` names the source of every value (a file name), or maps each key to its own.
    """
    src = where if isinstance(where, Sources) else Sources(default=where)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        key, message = _problem(cls, e)
        raise ConfigError(f"{src.of(key)}: {message}", key) from None


# pydantic's error types for a value of the right type that breaks its key's constraints
_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
          "too_short", "too_long", "string_too_short", "string_pattern_mismatch",
          "finite_number"}  # fmt: skip


def _problem(cls: type[Section], error: ValidationError) -> tuple[str, str]:
    """The first problem of ``error`` as (dotted key, one line without its source), in the
    order the loader always checked: renamed and unknown keys, types, then ranges. The
    members of a union (``bool | Literal["auto"]``) the value is not even of the type of
    come last: another member may say more; if none does, "must be bool or 'auto'"."""
    errors = [{**e, **_walk(cls, e["loc"])} for e in error.errors()]
    order = {"extra_forbidden": 0, **dict.fromkeys(_RANGE, 2)}
    e = min(
        errors, key=lambda e: -1 if e["key"] in MOVED else order.get(e["type"], 1 + 2 * e["union"])
    )
    key, got, kind, field = e["key"], e["input"], e["type"], e["field"]
    if key in MOVED:
        return key, f"{key} was replaced by {MOVED[key]}"
    if kind == "extra_forbidden":
        parent = key.rpartition(".")[0]
        unknown = sorted(
            x["key"] for x in errors if (x["type"], x["key"].rpartition(".")[0]) == (kind, parent)
        )
        return unknown[0], f"unknown key(s) {unknown}; valid: {sorted(e['owner'].model_fields)}"
    if kind == "value_error":  # a validator's own words
        return key, f"{key} {e['msg'].removeprefix('Value error, ')}"
    if kind in _RANGE:
        floats = not e["deep"] and float in _options(field.annotation)
        return key, f"{key} {_want(e)}, got {float(got) if floats and type(got) is int else got!r}"
    members = [x for x in errors if x["union"] and x["key"] == key] if e["union"] else [e]
    hint = _HINTS.get((key, got), "") if isinstance(got, str) else ""
    return key, f"{key or 'top level'} must be {_type_of(members)}, got {got!r}{hint}"


_TYPES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
          "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}  # fmt: skip


def _type_of(errors: list[dict]) -> str:
    """The type the value must have, from pydantic's error types: "int", "a mapping",
    "one of ['a', 'b']", or for a union's members "bool or 'auto'"."""
    words = [
        e["ctx"]["expected"] if e["type"] == "literal_error" else _TYPES.get(e["type"], e["msg"])
        for e in errors
    ]
    if len(words) > 1:
        return " or ".join(w.removeprefix("a ") for w in words)
    return (
        f"one of [{words[0].replace(' or ', ', ')}]"
        if errors[0]["type"] == "literal_error"
        else words[0]
    )


def _walk(cls: type[Section], loc: tuple) -> dict[str, Any]:
    """Where pydantic's error location ``loc`` points: the dotted ``key`` (list items as
    ``infer.ensemble[0].weight``), the ``field`` and the model (``owner``) of the innermost
    key, whether ``loc`` ends in a ``union``'s member and whether it points inside the key's
    value (``deep``: a list item, a mapping's value)."""
    at: dict[str, Any] = {"key": "", "field": None, "owner": cls, "union": False, "deep": False}
    tp: Any = cls
    for part in loc[:-2] if loc[-1:] == ("[key]",) else loc:  # (..., key, '[key]'): a bad key
        opts = _options(tp)
        if len(opts) > 1:  # pydantic names the member it tried: 'int', "literal['auto']"
            at["union"], tp = True, Any
        elif _section(opts[0]):
            field = opts[0].model_fields.get(part)
            tp = field.annotation if field else Any
            at.update(owner=opts[0], field=field, union=False, deep=False)
            at["key"] = f"{at['key']}.{part}".lstrip(".")
        else:  # a list index or a mapping's key
            tp = (typing.get_args(opts[0]) or [Any])[-1]
            at.update(union=False, deep=True)
            at["key"] += f"[{part}]" if isinstance(part, int) else f".{part}"
    return at


def _want(e: dict) -> str:
    """What the key's value must be: its field's ``want``, else words for its constraints
    (``ge=0, lt=1``: "must be in [0, 1)"; ``ge=1, le=15`` of an int: "must be in 1..15"),
    with "or null" where null is allowed."""
    field, deep = e["field"], e["deep"]
    if e["type"] == "finite_number":
        return "must be a finite number"
    if not deep and _extra(field, "want"):
        return _extra(field, "want")
    c = (not deep and _constraints(field)) or e.get("ctx") or {}
    ops = [(op, c[k]) for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in c]
    integer = not deep and int in _options(field.annotation)
    if "multiple_of" in c:
        words = f"must be a {'positive ' if c.get('gt') == 0 else ''}multiple of {c['multiple_of']}"
    elif len(ops) == 2 and integer and (ops[0][0], ops[1][0]) == (">=", "<="):
        words = f"must be in {ops[0][1]}..{ops[1][1]}"
    elif len(ops) == 2:
        (a, lo), (b, hi) = ops
        words = f"must be in {'[' if a == '>=' else '('}{lo:g}, {hi:g}{']' if b == '<=' else ')'}"
    else:
        words = f"must be {ops[0][0]} {ops[0][1]:g}" if ops else "must not be empty"
    nullable = not deep and type(None) in typing.get_args(field.annotation)
    return f"{words} or null" if nullable else words


# Values users reach for by analogy with other tools, with where the feature lives here.
_HINTS = {
    ("train.batch_size", "auto"): (
        " (the effective batch stays a number; train.micro_batch=auto fits the batch per"
        " forward to GPU memory and accumulates the rest)"
    ),
}


# ----------------------------------------------------------------------------- values
def check_values(cfg: Config) -> None:
    """Raise ``ConfigError`` for the first value of a wrong type or out of range (also one
    assigned after loading), then for the first broken rule between keys; needs no registry.
    The message is one line: where the value came from, the key, what it must be.
    """
    try:
        type(cfg).model_validate(cfg.model_dump(warnings=False))
    except ValidationError as e:
        k, message = _problem(type(cfg), e)
        raise ConfigError(f"{source_of(cfg, k)}: {message}", k) from None
    for k, message in _cross_field_problems(cfg):
        raise ConfigError(f"{source_of(cfg, k)}: {k} {message}", k)


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
def resume_may_change(cls: type[Section] = Config, prefix: str = "") -> set[str]:
    """Dotted keys (or whole sections) declared ``json_schema_extra=RESUME``: ``--resume``
    may change them (``training.state.check_resumable``)."""
    out: set[str] = set()
    for name, f in cls.model_fields.items():
        if _extra(f, "resume"):
            out.add(prefix + name)
        elif _section(f.annotation):
            out |= resume_may_change(f.annotation, f"{prefix}{name}.")
    return out


# ----------------------------------------------------------------------------- base.yaml
BASE_YAML = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
_COMMENT_AT = 32  # column of the comments
_WIDTH = 100

_BASE_HEADER = """\
# yaml-language-server: $schema=schema.json
# Every knob of the pipeline with its default. GENERATED from the models in
# bonecomp/config.py by `make base-config` (python scripts/write_base_config.py): edit a
# key's default or doc there, never here (tests/test_config.py fails when this is stale).
# A recipe says `extends: base.yaml` and overrides what differs; any key can also be
# overridden on the command line (train.epochs=50). Sections merge key by key; a list or
# a mapping given by a recipe (loss.terms, infer.tta) replaces the whole value.
"""


def base_yaml(cls: type[Section] = Config) -> str:
    """The text of ``configs/base.yaml``: every key of ``cls`` with its default and its
    doc as a comment, sections nested (see ``scripts/write_base_config.py``)."""
    return _BASE_HEADER + "".join(line + "\n" for line in _yaml_lines(cls, depth=0))


def _yaml_lines(cls: type[Section], depth: int) -> Iterator[str]:
    for name, f in cls.model_fields.items():
        pad, doc = "  " * depth, f.description or ""
        if _section(f.annotation):
            yield from _commented(f"{pad}{name}:", doc)
            yield from _yaml_lines(f.annotation, depth + 1)
        else:
            default = f.get_default(call_default_factory=True)
            if default and isinstance(default, list) and isinstance(default[0], dict):
                yield from _commented(f"{pad}{name}:", doc)  # one entry per line
                yield from (f"{pad}  - {_yaml_value(x)}" for x in default)
                continue
            yield from _commented(f"{pad}{name}: {_yaml_value(default)}", doc)


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
    """``v`` in YAML flow style on one line, as PyYAML reads it back (``1.0e-06``)."""
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...")


def write_base_yaml(path: Path = BASE_YAML) -> bool:
    """Write ``base_yaml()`` to ``path``; False when it was already up to date."""
    return _write_changed(path, base_yaml())


# ----------------------------------------------------------------------------- schema.json
SCHEMA_JSON = BASE_YAML.with_name("schema.json")
_EXTENDS = {"type": "string", "description": "the recipe this one overrides, relative to it"}


def schema_json(cls: type[Section] = Config) -> str:
    """The text of ``configs/schema.json``: the JSON Schema of a recipe, which editors
    (yaml-language-server) read from each recipe's first line for completion and checks.
    Every key is optional (each has its default); ``extends`` is allowed at the top."""
    schema = cls.model_json_schema()
    schema["properties"] = {"extends": _EXTENDS, **schema["properties"]}
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(_flat_descriptions(schema), indent=2) + "\n"


def _flat_descriptions(node: Any) -> Any:
    """The schema with each description (a docstring, wrapped in the code) on one line."""
    if isinstance(node, list):
        return [_flat_descriptions(x) for x in node]
    if not isinstance(node, dict):
        return node
    return {
        k: " ".join(v.split()) if k == "description" else _flat_descriptions(v)
        for k, v in node.items()
    }


def write_schema(path: Path = SCHEMA_JSON) -> bool:
    """Write ``schema_json()`` to ``path``; False when it was already up to date."""
    return _write_changed(path, schema_json())


def _write_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    write_text(path, text)
    return True
