"""Experiment configuration: YAML files -> typed dataclasses, with dotted CLI overrides.

The dataclasses below hold the only defaults (the competition's); ``configs/base.yaml``
repeats every key with comments, and a test keeps the two identical. A recipe YAML may
name a parent with ``extends: base.yaml`` (path relative to the file); sections merge key
by key, any value (a list, or a mapping such as ``loss.terms``) is replaced. Unknown keys,
wrong types and values out of range are errors on one line that name the key and where
its value came from (the YAML file, or "command line"), so a typo never silently falls
back to a default. Names that need a registry (architecture, encoder, loss terms,
optimizer, TTA) are checked by ``bonecomp.checks.check_config``.

The loader is hand-written rather than OmegaConf: it is ~150 lines with no dependency,
and OmegaConf would still need a wrapper for one-line errors that say which file or
override a value came from.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


@dataclass
class AugmentConfig:
    """Training augmentation (albumentations); validation uses none."""

    hflip: float = 0.5
    vflip: float = 0.0
    shift: float = 0.06
    scale: float = 0.1
    rotate: float = 20.0  # degrees; test hands are often bent, so rotation matters
    affine_p: float = 0.7
    brightness_contrast: float = 0.2
    brightness_contrast_p: float = 0.5
    clahe_p: float = 0.0


@dataclass
class DataConfig:
    root: str = "data/competition"
    image_size: int = 512  # square training resolution; the cache is built at this size
    cache_dir: str = "cache"
    n_splits: int = 5
    fold_seed: int | None = None  # None: plain GroupKFold; an int shuffles patients
    exclude: list[str] = field(default_factory=list)  # training image names to drop
    soft_targets: bool = True  # fractional pixel coverage as targets (see data/rasterize.py)
    soft_k: int = 4  # sub-samples per side for soft targets
    num_workers: int = 8
    on_bad_image: Literal["error", "skip"] = "error"  # unusable training image: stop or skip it
    crop: Literal["carpal"] | None = None  # train on crops: "carpal" = box of the 8 carpals
    crop_margin: float = 0.25  # crop box: the carpals' square box grown by this share per side
    crop_jitter: float = 0.05  # training: random shift/scale of the crop, share of its side
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = "imagenet"  # "imagenet", None, or a path to a weights file
    fcn_upsample: Literal["bilinear", "learned"] = "bilinear"  # FCN heads only
    init_bias: float | None = -4.0  # output bias start: foreground prior logit (None: default)


@dataclass
class LossConfig:
    terms: dict[str, float] = field(default_factory=lambda: {"bce": 0.5, "dice": 0.5})
    dice_smooth: float = 1.0
    dice_over_batch: bool = True  # soft Dice over the whole batch per class (stable early on)
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3  # weight of false positives
    tversky_beta: float = 0.7  # weight of false negatives (thin bone tips are missed first)


SCHEDULERS = ("cosine", "poly", "step", "plateau", "constant", "none")


@dataclass
class TrainConfig:
    experiment: str = "default"
    output_dir: str = "runs"
    epochs: int = 40
    batch_size: int = 8
    optimizer: str = "adamw"  # any timm optimizer name (timm.optim.list_optimizers())
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # optimizers with momentum only (sgd, ...)
    scheduler: Literal["cosine", "poly", "step", "plateau", "constant", "none"] = "cosine"
    warmup_epochs: float = 1.0  # linear warm-up, per update, from min_lr
    min_lr: float | None = None  # floor of the schedule and start of warm-up; None: lr / 100
    decay_epochs: float = 10.0  # step: epochs between decays
    decay_rate: float = 0.1  # step, plateau: lr factor at each decay
    patience_epochs: int = 5  # plateau: validations without a better Dice before a decay
    poly_power: float = 0.9  # poly: exponent of the decay
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with a grad scaler
    channels_last: bool | Literal["auto"] = "auto"  # auto: on CUDA only (slower on CPU)
    ema: float | None = None  # EMA decay of weights, e.g. 0.999
    seed: int = 42
    val_every: int = 1
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    max_train_minutes: float | None = None  # stop after this long (demo on CPU)
    save_oof: bool = True
    oof_size: int = 256  # side of the saved out-of-fold probabilities
    tensorboard: bool = False
    wandb: bool = False
    # images per forward: None (the batch), n, or "auto" (probed on the GPU)
    micro_batch: int | Literal["auto"] | None = None
    memory_fraction: float = 0.85  # "auto" keeps the probed peak under this share of the GPU
    compile: bool = False  # torch.compile the training model (checkpoints stay plain)
    report: bool = True  # scripts/train.py refreshes runs/<experiment>/report.html per fold
    pseudo_labels: str | None = None  # folder from scripts/pseudo_label.py: added to training
    pseudo_weight: float = 1.0  # pseudo images drawn per epoch, as a share of the pseudo set
    pseudo_rule: Literal["soft", "sharpen"] = "soft"  # target: the probability, or snapped
    pseudo_confidence: float = 0.9  # sharpen: p >= this -> 1, p <= 1 - this -> 0


@dataclass
class EnsembleMember:
    experiment: str = ""
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    weight: float = 1.0
    checkpoint: str = "best"  # "best", "last", or a checkpoint file name in the fold folder


@dataclass
class CarpalStageConfig:
    """Second stage: a crop experiment re-predicts the carpals inside the box that the
    first stage's carpal pixels give (``inference.carpal_stage``)."""

    experiment: str | None = None  # None: no crop stage
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    checkpoint: str = "best"
    weight: float | list[float] = 1.0  # crop's share in the carpals' blend: one, or 8 (per carpal)
    margin: float | None = None  # None: data.crop_margin of the crop experiment's checkpoint
    threshold: float = 0.5  # first-stage probability that counts as a carpal pixel for the box


@dataclass
class InferConfig:
    name: str = "submission"
    out_dir: str = "submissions"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    amp: bool = True  # CUDA only: bf16 where supported, else fp16
    tta: list[str] = field(default_factory=lambda: ["none", "hflip"])
    scales: list[float] = field(default_factory=lambda: [1.0])
    sliding_window: bool = False
    tile: int = 1024
    overlap: float = 0.25
    batch_size: int = 4
    thresholds: str | None = None  # thresholds file from scripts/tune_thresholds.py
    threshold: float = 0.5
    num_workers: int = 4
    ensemble: list[EnsembleMember] = field(default_factory=list)  # empty: train.experiment
    compile: bool = False  # torch.compile each member
    crop: CarpalStageConfig = field(default_factory=CarpalStageConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


# Keys that were renamed: a file that still uses one gets the new form in the error.
MOVED = {
    "loss.bce_weight": "loss.terms (e.g. `loss: {terms: {bce: 0.5, dice: 0.5}}`)",
    "loss.dice_weight": "loss.terms (e.g. `loss: {terms: {bce: 0.5, dice: 0.5}}`)",
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
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = doc.pop("extends", None)
    base = {} if parent is None else _read_yaml_chain(path.parent / parent, sources, (*seen, path))
    for key in _leaf_keys(doc, Config):
        sources.set(key, str(path))
    return _merge(base, doc, Config)


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
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _prob(v: float) -> bool:
    return 0 <= v <= 1


# (key, test, what the value must be); None passes wherever a key is optional.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("data.image_size", lambda v: v > 0 and v % 32 == 0, "must be a positive multiple of 32"),
    ("data.n_splits", lambda v: v >= 2, "must be >= 2"),
    ("data.soft_k", lambda v: 1 <= v <= 15, "must be in 1..15"),
    ("data.num_workers", lambda v: v >= 0, "must be >= 0"),
    ("data.crop_margin", lambda v: 0 <= v <= 2, "must be in [0, 2] (share of the box per side)"),
    ("data.crop_jitter", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    ("data.augment.hflip", _prob, "must be a probability in [0, 1]"),
    ("data.augment.vflip", _prob, "must be a probability in [0, 1]"),
    ("data.augment.affine_p", _prob, "must be a probability in [0, 1]"),
    ("data.augment.brightness_contrast_p", _prob, "must be a probability in [0, 1]"),
    ("data.augment.clahe_p", _prob, "must be a probability in [0, 1]"),
    ("data.augment.shift", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("data.augment.scale", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("data.augment.rotate", lambda v: 0 <= v <= 180, "must be in [0, 180] degrees"),
    ("data.augment.brightness_contrast", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("loss.terms", lambda v: all(w >= 0 for w in v.values()), "must have weights >= 0"),
    ("loss.terms", lambda v: any(w > 0 for w in v.values()), "needs a weight > 0"),
    ("loss.dice_smooth", lambda v: v >= 0, "must be >= 0"),
    ("loss.focal_gamma", lambda v: v >= 0, "must be >= 0"),
    ("loss.tversky_alpha", lambda v: v >= 0, "must be >= 0"),
    ("loss.tversky_beta", lambda v: v >= 0, "must be >= 0"),
    (
        "train.experiment",
        lambda v: bool(v) and "/" not in v,
        "must be a non-empty name without '/'",
    ),
    ("train.epochs", lambda v: v >= 1, "must be >= 1"),
    ("train.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("train.lr", lambda v: v > 0, "must be > 0"),
    ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("train.momentum", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("train.warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("train.min_lr", lambda v: v is None or v >= 0, "must be >= 0 or null"),
    ("train.decay_epochs", lambda v: v > 0, "must be > 0"),
    ("train.decay_rate", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("train.patience_epochs", lambda v: v >= 0, "must be >= 0"),
    ("train.poly_power", lambda v: v > 0, "must be > 0"),
    ("train.grad_clip", lambda v: v is None or v > 0, "must be > 0 or null"),
    ("train.accum_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.micro_batch", lambda v: v in (None, "auto") or v >= 1, "must be >= 1, auto or null"),
    ("train.memory_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("train.ema", lambda v: v is None or 0 < v < 1, "must be in (0, 1) or null"),
    ("train.val_every", lambda v: v >= 1, "must be >= 1"),
    ("train.device", DEVICE.fullmatch, "must be auto, cpu, mps, cuda or cuda:<index>"),
    ("train.max_train_minutes", lambda v: v is None or v > 0, "must be > 0 or null"),
    ("train.oof_size", lambda v: v >= 1, "must be >= 1"),
    ("train.pseudo_labels", lambda v: v is None or bool(v), "must name a folder or be null"),
    (
        "train.pseudo_weight",
        lambda v: v > 0 and math.isfinite(v),
        "must be > 0 (1.0: each pseudo image once per epoch)",
    ),
    ("train.pseudo_confidence", lambda v: 0.5 < v <= 1, "must be in (0.5, 1]"),
    ("infer.name", bool, "must be a non-empty name"),
    ("infer.device", DEVICE.fullmatch, "must be auto, cpu, mps, cuda or cuda:<index>"),
    ("infer.tta", bool, "must be a non-empty list"),
    (
        "infer.scales",
        lambda v: bool(v) and all(s > 0 for s in v),
        "must be a non-empty list of > 0",
    ),
    ("infer.tile", lambda v: v > 0 and v % 32 == 0, "must be a positive multiple of 32"),
    ("infer.overlap", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("infer.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("infer.threshold", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("infer.num_workers", lambda v: v >= 0, "must be >= 0"),
    (
        "infer.crop.margin",
        lambda v: v is None or 0 <= v <= 2,
        "must be in [0, 2] (share of the box per side) or null",
    ),
    ("infer.crop.threshold", lambda v: 0 < v < 1, "must be in (0, 1)"),
    (
        "infer.crop.weight",
        lambda v: (
            all(0 <= w <= 1 for w in ([v] if isinstance(v, float) else v))
            and (isinstance(v, float) or len(v) == 8)
        ),
        "must be one share in [0, 1] or 8 (one per carpal, classes.CARPALS order)",
    ),
]


def check_values(cfg: Config) -> None:
    """Raise ``ConfigError`` for the first value out of range; needs no registry.

    The message is one line: where the value came from, the key, what it must be.
    """
    for key, message in _value_problems(cfg):
        raise ConfigError(f"{source_of(cfg, key)}: {key} {message}", key)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _value_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    for key, ok, want in RULES:
        v = _get(cfg, key)
        if not ok(v):
            yield key, f"{want}, got {v!r}"
    t = cfg.train
    if t.warmup_epochs > t.epochs:
        yield "train.warmup_epochs", f"must be <= train.epochs ({t.epochs}), got {t.warmup_epochs}"
    if t.min_lr is not None and t.min_lr > t.lr:
        yield "train.min_lr", f"must be <= train.lr ({t.lr}), got {t.min_lr}"
    seen_tta: set[str] = set()
    for i, name in enumerate(cfg.infer.tta):
        if name in seen_tta:
            yield f"infer.tta[{i}]", f"lists {name!r} twice"
        seen_tta.add(name)
    crop = cfg.infer.crop
    if crop.experiment is not None:
        if not crop.experiment or "/" in crop.experiment:
            got = f"got {crop.experiment!r}"
            yield "infer.crop.experiment", f"must be a name without '/' or null, {got}"
        if not crop.folds or len(set(crop.folds)) != len(crop.folds):
            yield "infer.crop.folds", f"must list folds once each, got {crop.folds}"
        bad = [f for f in crop.folds if not 0 <= f < cfg.data.n_splits]
        if bad:
            yield "infer.crop.folds", f"must be in 0..{cfg.data.n_splits - 1}, got {bad}"
    members: dict[tuple[str, str], int] = {}
    for i, m in enumerate(cfg.infer.ensemble):
        key = f"infer.ensemble[{i}]"
        if not m.experiment:
            yield f"{key}.experiment", "must name an experiment (train.experiment of its runs)"
        if not m.folds:
            yield f"{key}.folds", "must list at least one fold"
        bad = [f for f in m.folds if not 0 <= f < cfg.data.n_splits]
        if bad:
            yield (
                f"{key}.folds",
                f"must be in 0..{cfg.data.n_splits - 1} (data.n_splits), got {bad}",
            )
        if len(set(m.folds)) != len(m.folds):
            yield f"{key}.folds", f"lists a fold twice: {m.folds}"
        if not (m.weight > 0 and math.isfinite(m.weight)):
            yield f"{key}.weight", f"must be > 0, got {m.weight!r}"
        first = members.setdefault((m.experiment, m.checkpoint), i)
        if first != i:
            yield (
                f"{key}.experiment",
                f"{m.experiment!r} ({m.checkpoint}) is already infer.ensemble[{first}]; "
                "list its folds once",
            )
