"""BCE-with-logits + soft Dice for multilabel segmentation (one sigmoid per class)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bonecomp.config import LossConfig


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


class BceDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * (1 - soft Dice)``; a weight of 0 drops the term.

    Targets may be soft (fractional coverage in [0, 1]). Computed in float32 even under
    autocast.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        if self.cfg.bce_weight < 0 or self.cfg.dice_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.cfg.bce_weight == 0 and self.cfg.dice_weight == 0:
            raise ValueError("loss.bce_weight and loss.dice_weight are both 0")

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        zero = logits.new_zeros((), dtype=torch.float32)
        bce = (
            F.binary_cross_entropy_with_logits(logits.float(), target.float())
            if c.bce_weight
            else zero
        )
        dice = (
            soft_dice_loss(logits, target, c.dice_smooth, c.dice_over_batch)
            if c.dice_weight
            else zero
        )
        loss = c.bce_weight * bce + c.dice_weight * dice
        return loss, {"bce": float(bce.detach()), "dice": float(dice.detach())}
