"""The whole config checked before any expensive work (cache build, model, download).

``load_config`` already checks types and ranges; ``check_config`` imports the user's
``extensions`` (where their registrations live) and adds the names that need a registry
(fold stratifier, preprocessing steps, the albumentations of ``data.augment``,
architecture, encoder and input size, loss terms and the sample fields they read, optimizer,
TTA views, clean-up rules, trackers: each
against its ``bonecomp.registry``, the config holding plain names), the output folders
and the packages of the experiment trackers, in milliseconds and without building a model
(a ``tu-`` encoder is built on the meta device, ~0.5 s, to read the input size it takes:
every side the network will see is checked against it). Every error is one line: where
the value came from (the YAML file, or "command line"), the key, and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bonecomp.checkpoint import init_checkpoint
from bonecomp.config import Config, ConfigError, LossConfig, check_values, source_of
from bonecomp.data.augment import check_augment
from bonecomp.data.folds import STRATIFIERS
from bonecomp.data.preprocess import check_preprocess
from bonecomp.data.sample import FIELDS
from bonecomp.extensions import import_extensions
from bonecomp.inference.cleanup import CLEANUP_RULES
from bonecomp.inference.tta import VIEWS, scaled_side
from bonecomp.losses import check_loss_config, term_fields
from bonecomp.models import check_input_side, check_model_config, create_model
from bonecomp.models.encoder_weights import WeightsError
from bonecomp.optim import check_optimizer_name
from bonecomp.trackers import check_trackers


def check_config(cfg: Config, training: bool = True) -> None:
    """Raise ``ConfigError`` for the first problem of ``cfg``; see the module docstring.

    ``training``: also the keys only training uses (the trackers' packages), so a recipe
    that logs to W&B still predicts on a machine without wandb.
    """
    check_values(cfg)
    checks: list[Callable[[], None]] = [
        lambda: import_extensions(cfg.extensions),  # first: they add registry entries
        lambda: _check_patches(cfg),
        lambda: _check_fold_stratify(cfg.data.fold_stratify),
        lambda: check_preprocess(cfg.data),
        lambda: check_augment(cfg.data),
        lambda: check_model_config(cfg.model, cfg.data.image_size, cfg.data.patch_size),
        lambda: check_loss_config(cfg.loss),
        lambda: _check_loss_fields(cfg.loss),
        lambda: check_optimizer_name(cfg.train.optimizer),
        lambda: _check_tta(cfg.infer.tta),
        lambda: CLEANUP_RULES.check(cfg.infer.cleanup_rules or []),
        lambda: _check_input_sides(cfg),
        lambda: _check_folders(cfg),
        lambda: check_trackers(cfg.train.trackers if training else []),
        lambda: init_checkpoint(cfg) if training else None,  # loads it: ~1 s at most
        lambda: _check_encoder_weights(cfg) if training else None,  # a file: ~1 s
    ]
    for check in checks:
        try:
            check()
        except ConfigError as e:
            if e.key is None:
                raise
            raise ConfigError(f"{source_of(cfg, e.key)}: {e}", e.key) from None


def _check_encoder_weights(cfg: Config) -> None:
    """A ``model.encoder_weights`` file loads into the recipe's encoder: the model is built
    with it, as training will build it, now rather than after the cache (a missing,
    damaged, unsafe or foreign file is one line naming the key). Not used, so not checked,
    under ``train.init_from`` (whose weights replace the encoder's)."""
    key, weights = "model.encoder_weights", cfg.model.encoder_weights
    if weights in (None, "imagenet") or cfg.train.init_from is not None:
        return
    try:
        create_model(cfg.model)
    except WeightsError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(key) else f"{key}: {msg}", key) from None


def _check_fold_stratify(rule: str | None) -> None:
    """``data.fold_stratify`` is null or a registered rule (``data.folds.register_stratifier``)."""
    if rule is not None:
        STRATIFIERS.get(rule)


def _check_tta(names: list[str]) -> None:
    """Each ``infer.tta`` name is a registered view (``inference.tta.register_view``)."""
    VIEWS.check(names)


def _check_loss_fields(loss: LossConfig) -> None:
    """Each sample field a configured loss term reads is registered
    (``bonecomp.data.sample.register_field``); worded by the registry, naming the term."""
    for term, names in term_fields(loss).items():
        for name in names:
            if name not in FIELDS:
                e = FIELDS.unknown(name)
                raise ConfigError(f"{e} (read by loss term {term!r})", e.key)


# The keys that name folders the pipeline writes into.
FOLDER_KEYS = ("data.cache_dir", "train.output_dir", "infer.out_dir")


def _check_folders(cfg: Config) -> None:
    """Each output folder key names a folder or a path that can become one: not a file,
    and not below one (``mkdir`` would fail later with a traceback, after the work)."""
    for key in FOLDER_KEYS:
        section, name = key.split(".")
        path = Path(getattr(getattr(cfg, section), name))
        for part in (path, *path.parents):
            if part.exists() or part.is_symlink():
                if not part.is_dir():
                    what = "is a file" if part == path else f"is below the file {part}"
                    raise ConfigError(
                        f"{key}: {path} {what}, not a folder; point {key} at a folder", key
                    )
                break


def _check_patches(cfg: Config) -> None:
    """``data.patch_size`` fits inside ``data.image_size`` and is not combined with a
    carpal crop (the crop is already the region of interest, at its own size)."""
    d = cfg.data
    if d.patch_size is None:
        return
    key = "data.patch_size"
    if d.patch_size > d.image_size:
        raise ConfigError(
            f"{key}={d.patch_size} is larger than data.image_size={d.image_size}: a patch is "
            f"cut from the image; set {key} <= {d.image_size} (or null for whole images)",
            key,
        )
    if d.crop is not None:
        raise ConfigError(
            f"{key}={d.patch_size} with data.crop={d.crop}: the crop is already the region "
            f"the model sees; set {key}=null (or data.crop=null to train patches of whole X-rays)",
            key,
        )


def _check_input_sides(cfg: Config) -> None:
    """Every input side the network is fed (training at ``data.image_size`` or
    ``data.patch_size``; inference at each ``infer.scales`` factor, in windows of the
    patch side or in ``infer.tile`` tiles with the sliding window) fits the encoder: a
    fixed-size one (``models.fixed_input_side``) takes one side only."""
    size, patch, inf = cfg.data.image_size, cfg.data.patch_size, cfg.infer
    train_key = "data.image_size" if patch is None else "data.patch_size"
    check_input_side(cfg.model, train_key, patch or size)
    tile, tile_key = (patch, "data.patch_size") if patch else (inf.tile, "infer.tile")
    tiled = bool(patch) or (inf.sliding_window and inf.tile < size)  # as the ensemble decides
    for i, scale in enumerate(inf.scales):
        side = scaled_side(size, scale)
        if tiled and tile < side:
            check_input_side(cfg.model, tile_key, tile)
        else:
            check_input_side(cfg.model, f"infer.scales[{i}]", side)
