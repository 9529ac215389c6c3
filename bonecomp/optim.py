"""Optimizer and learning-rate schedule from the config, through timm's factories.

Contract for the training loop (every scheduler here follows timm's):
``scheduler.step_update(num_updates)`` after each optimizer update, and
``scheduler.step(epoch + 1, metric=val_dice_or_None)`` at the end of each epoch
(``plateau`` needs the metric; the others move per update and ignore ``step``).
Schedules count updates, so ``train.warmup_epochs`` may be fractional (0.5 epoch).
"""

from __future__ import annotations

from typing import Any

import timm.optim
import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from bonecomp.config import ConfigError, TrainConfig


def check_optimizer_name(name: str) -> None:
    """Raise ``ConfigError`` (key ``train.optimizer``) if timm does not know ``name``."""
    valid = timm.optim.list_optimizers()
    if name.lower() not in valid:
        raise ConfigError(
            f"train.optimizer: unknown optimizer {name!r}; valid (timm): {valid}",
            "train.optimizer",
        )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` with ``train.optimizer/lr/weight_decay/momentum``.

    ``adamw`` is torch's AdamW; timm's ``sgd`` uses Nesterov momentum (``momentum`` is
    plain; ``sgd`` with ``train.momentum`` 0 is plain SGD). Weight decay applies to every
    parameter, biases and norms included, as before (timm's ``filter_bias_and_bn`` would
    exempt them).
    """
    check_optimizer_name(cfg.optimizer)
    opt = cfg.optimizer
    if cfg.momentum == 0 and opt.lower() in ("sgd", "nesterov"):
        opt = "momentum"  # Nesterov without momentum is plain SGD (torch refuses the pair)
    return timm.optim.create_optimizer_v2(
        model,
        opt=opt,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=False,
    )


def min_lr(cfg: TrainConfig) -> float:
    """The schedule's floor and warm-up start: ``train.min_lr``, or ``train.lr`` / 100."""
    return cfg.min_lr if cfg.min_lr is not None else cfg.lr * 0.01


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int
) -> Scheduler | PlateauScheduler:
    """The ``train.scheduler`` schedule, counted in optimizer updates.

    cosine, poly (``train.poly_power``), step (x ``train.decay_rate`` every
    ``train.decay_epochs``) and constant come from ``timm.scheduler.create_scheduler_v2``,
    each with a linear warm-up from ``min_lr`` over ``int(warmup_epochs x updates)``
    updates; ``none`` is a flat ``train.lr`` without warm-up; ``plateau`` decays when the
    validation Dice stops improving (``PlateauScheduler``).
    """
    per_epoch = max(updates_per_epoch, 1)
    floor = min_lr(cfg)
    warmup = int(cfg.warmup_epochs * per_epoch)
    if cfg.scheduler == "plateau":
        return PlateauScheduler(optimizer, cfg, floor, warmup)
    name = cfg.scheduler
    if name == "none":
        name, warmup = "constant", 0
    scheduler, _ = create_scheduler_v2(
        optimizer,
        name,
        num_epochs=max(cfg.epochs * per_epoch, 1),
        decay_epochs=cfg.decay_epochs * per_epoch,
        decay_rate=cfg.poly_power if name == "poly" else cfg.decay_rate,
        min_lr=floor,
        warmup_lr=floor,
        warmup_epochs=warmup,
        step_on_epochs=False,
        updates_per_epoch=1,  # every count above is already in updates
    )
    return scheduler


class PlateauScheduler:
    """Decay the lr by ``train.decay_rate`` after ``train.patience_epochs`` validations
    without a better Dice (torch's ``ReduceLROnPlateau``), after a per-update warm-up.

    timm's own plateau scheduler is deprecated and does not save its state; this one
    follows timm's calling convention and its state resumes with the checkpoint.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, floor: float, warmup: int
    ) -> None:
        self.optimizer, self.floor, self.warmup = optimizer, floor, warmup
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.num_updates = 0
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.decay_rate, patience=cfg.patience_epochs,
            min_lr=floor,
        )  # fmt: skip
        self.step_update(num_updates=0)

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.num_updates = num_updates
        if num_updates < self.warmup:
            for g, base in zip(self.optimizer.param_groups, self.base, strict=True):
                g["lr"] = self.floor + (base - self.floor) * num_updates / self.warmup
        elif num_updates == self.warmup:
            for g, base in zip(self.optimizer.param_groups, self.base, strict=True):
                g["lr"] = base

    def step(self, epoch: int, metric: float | None = None) -> None:
        if metric is not None and self.num_updates >= self.warmup:
            self.plateau.step(metric)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = state["num_updates"]
        self.plateau.load_state_dict(state["plateau"])
