"""Multilabel segmentation losses by name: a weighted sum of terms (``loss.terms``).

``TERMS`` is the registry: ``bce`` (torch), ``dice`` (ours, below), and ``focal``,
``jaccard``, ``lovasz``, ``tversky`` from segmentation_models_pytorch (mode
"multilabel", from logits). Every term sees float32 logits and targets (also under
autocast); targets may be soft (fractional coverage in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
from torch import nn

from bonecomp.config import ConfigError, LossConfig


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, over_batch: bool = True
) -> torch.Tensor:
    """1 - mean soft Dice per class (per image and class if not ``over_batch``).

    Over the batch, rare classes missing from one image do not produce a meaningless 0/0
    term, which keeps early training stable.
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    dims = (0, 2, 3) if over_batch else (2, 3)
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


class SoftDiceLoss(nn.Module):
    """Our soft Dice, kept instead of ``smp.losses.DiceLoss``: smp zeroes the loss of a
    class absent from the batch (so false positives there cost nothing) and has no
    per-image mode; with ``smooth`` > 0 ours still pushes such predictions down."""

    def __init__(self, smooth: float = 1.0, over_batch: bool = True) -> None:
        super().__init__()
        self.smooth, self.over_batch = smooth, over_batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, target, self.smooth, self.over_batch)


MULTILABEL = smp.losses.MULTILABEL_MODE

# name -> builder from the loss config. An unknown name lists these keys.
TERMS: dict[str, Callable[[LossConfig], nn.Module]] = {
    "bce": lambda c: nn.BCEWithLogitsLoss(),
    "dice": lambda c: SoftDiceLoss(c.dice_smooth, c.dice_over_batch),
    "focal": lambda c: smp.losses.FocalLoss(MULTILABEL, gamma=c.focal_gamma),
    "jaccard": lambda c: smp.losses.JaccardLoss(MULTILABEL, from_logits=True),
    "lovasz": lambda c: smp.losses.LovaszLoss(MULTILABEL, from_logits=True),
    "tversky": lambda c: smp.losses.TverskyLoss(
        MULTILABEL, from_logits=True, alpha=c.tversky_alpha, beta=c.tversky_beta
    ),
}


def check_loss_config(cfg: LossConfig) -> None:
    """Raise ``ConfigError`` (key ``loss.terms``) for an unknown or unusable term."""
    unknown = sorted(set(cfg.terms) - set(TERMS))
    if unknown:
        raise ConfigError(
            f"loss.terms: unknown term(s) {unknown}; valid: {sorted(TERMS)}", "loss.terms"
        )
    if any(w < 0 for w in cfg.terms.values()) or not any(w > 0 for w in cfg.terms.values()):
        raise ConfigError(
            f"loss.terms: weights must be >= 0 and one > 0, got {cfg.terms}", "loss.terms"
        )


class WeightedLoss(nn.Module):
    """``sum(weight * term(logits, target))`` over the terms with a weight > 0.

    ``forward`` returns ``(total, parts)``; ``parts`` holds each unweighted term as a
    float under ``loss_<term>`` (never a bare ``dice``, which reads like ``val_dice``).
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or LossConfig()
        check_loss_config(cfg)
        self.weights = {name: float(w) for name, w in cfg.terms.items() if w > 0}
        self.terms = nn.ModuleDict({name: TERMS[name](cfg) for name in self.weights})

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits, target = logits.float(), target.float()
        total = logits.new_zeros(())
        parts = {}
        for name, term in self.terms.items():
            value = term(logits, target)
            total = total + self.weights[name] * value
            parts[f"loss_{name}"] = float(value.detach())
        return total, parts


def build_loss(cfg: LossConfig) -> nn.Module:
    """The configured loss; ``forward(logits, target) -> (total, {"loss_<term>": float})``."""
    return WeightedLoss(cfg)
