"""Experiment configuration: YAML files -> typed dataclasses, with dotted CLI overrides.

A recipe YAML may name a parent with ``extends: base.yaml`` (path relative to the file);
mappings merge key by key, anything else is replaced. Unknown keys and wrong types are
errors that name the key and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault."""


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
    root: str = "data/phantom"
    image_size: int = 512  # square training resolution; the cache is built at this size
    cache_dir: str = "cache"
    n_splits: int = 5
    fold_seed: int | None = None  # None: plain GroupKFold; an int shuffles patients
    exclude: list[str] = field(default_factory=list)  # training image names to drop
    soft_targets: bool = True  # fractional pixel coverage as targets (see data/rasterize.py)
    soft_k: int = 4  # sub-samples per side for soft targets
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None  # "imagenet", None, or a path to a weights file
    fcn_upsample: str = "bilinear"  # FCN heads: "bilinear" or "learned"
    init_bias: float | None = -4.0  # output bias start: foreground prior logit (None: default)


@dataclass
class LossConfig:
    bce_weight: float = 0.5
    dice_weight: float = 0.5
    dice_smooth: float = 1.0
    dice_over_batch: bool = True  # soft Dice over the whole batch per class (stable early on)


@dataclass
class TrainConfig:
    experiment: str = "default"
    output_dir: str = "runs"
    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with a grad scaler
    channels_last: bool = True  # NHWC memory format: faster on CUDA and on CPU (oneDNN)
    ema: float | None = None  # EMA decay of weights, e.g. 0.999
    seed: int = 42
    val_every: int = 1
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    max_train_minutes: float | None = None  # stop after this long (demo on CPU)
    save_oof: bool = True
    oof_size: int = 256  # side of the saved out-of-fold probabilities
    tensorboard: bool = False
    wandb: bool = False
    micro_batch: int | str | None = None  # images per forward: None (the batch), n, "auto"
    memory_fraction: float = 0.85  # "auto" keeps the probed peak under this share of the GPU
    compile: bool = False  # torch.compile the training model (checkpoints stay plain)


@dataclass
class EnsembleMember:
    experiment: str = ""
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    weight: float = 1.0
    checkpoint: str = "best.pt"


@dataclass
class InferConfig:
    name: str = "submission"
    out_dir: str = "submissions"
    tta: list[str] = field(default_factory=lambda: ["none", "hflip"])
    scales: list[float] = field(default_factory=lambda: [1.0])
    sliding_window: bool = False
    tile: int = 1024
    overlap: float = 0.25
    batch_size: int = 4
    thresholds: str | None = None  # thresholds file from scripts/tune_thresholds.py
    threshold: float = 0.5
    num_workers: int = 2
    ensemble: list[EnsembleMember] = field(default_factory=list)  # empty: every best.pt
    compile: bool = False  # torch.compile each member


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (following ``extends``), apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = _read_yaml_chain(Path(path)) if path else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(Config, raw, where=str(path) if path else "config")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for saving the resolved config and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
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
    if parent is None:
        return doc
    base = _read_yaml_chain(path.parent / parent, (*seen, path))
    return _merge(base, doc)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value ({e})") from e


def from_dict(cls: type, raw: Any, where: str = "config", key: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {key or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        pre = f"{key}." if key else ""
        raise ConfigError(
            f"{where}: unknown key(s) {[pre + u for u in unknown]}; valid: {sorted(names)}"
        )
    kwargs = {n: _coerce(hints[n], v, where, f"{key}.{n}" if key else n) for n, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, where: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, v, where, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {key}: bad value {v!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where, key)
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{where}: {key} must be a list, got {v!r}")
        return [_coerce(args[0], x, where, f"{key}[{i}]") for i, x in enumerate(v)]
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            pass
    if tp in (int, str, bool, float) and type(v) is tp:
        return v
    raise ConfigError(f"{where}: {key} must be {getattr(tp, '__name__', tp)}, got {v!r}")
