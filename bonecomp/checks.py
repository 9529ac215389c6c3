"""The whole config checked before any expensive work (cache build, model, download).

``load_config`` already checks types and ranges; ``check_config`` imports the user's
``extensions`` (where their registrations live) and adds the names that need a registry
(architecture, encoder and input size, loss terms, optimizer, TTA) and the packages of the
experiment trackers, in milliseconds and without building a model. Every error is one
line: where the value came from (the YAML file, or "command line"), the key, and what is
wrong.
"""

from __future__ import annotations

from collections.abc import Callable

from bonecomp.config import Config, ConfigError, check_values, source_of
from bonecomp.extensions import import_extensions
from bonecomp.inference.tta import get_view
from bonecomp.losses import check_loss_config
from bonecomp.models import check_model_config
from bonecomp.optim import check_optimizer_name
from bonecomp.trackers import check_trackers


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for the first problem of ``cfg``; see the module docstring."""
    check_values(cfg)
    checks: list[Callable[[], None]] = [
        lambda: import_extensions(cfg.extensions),  # first: they add registry entries
        lambda: check_model_config(cfg.model, cfg.data.image_size),
        lambda: check_loss_config(cfg.loss),
        lambda: check_optimizer_name(cfg.train.optimizer),
        lambda: _check_tta(cfg.infer.tta),
        lambda: check_trackers(cfg.train.trackers),
    ]
    for check in checks:
        try:
            check()
        except ConfigError as e:
            if e.key is None:
                raise
            raise ConfigError(f"{source_of(cfg, e.key)}: {e}", e.key) from None


def _check_tta(names: list[str]) -> None:
    """Each ``infer.tta`` name is a registered view (``inference.tta.register_view``)."""
    for i, name in enumerate(names):
        try:
            get_view(name)
        except ValueError as e:  # worded once, by the registry
            key = f"infer.tta[{i}]"
            raise ConfigError(f"{key}: {e}", key) from None
