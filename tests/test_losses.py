"""Loss values on known cases."""

from __future__ import annotations

import math

import pytest
import torch

from bonecomp.config import LossConfig
from bonecomp.losses import BceDiceLoss, soft_dice_loss


def test_bce_of_zero_logits_is_log2():
    loss, parts = BceDiceLoss(LossConfig(bce_weight=1, dice_weight=0))(
        torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    )
    assert loss.item() == pytest.approx(math.log(2))
    assert parts["dice"] == 0


def test_perfect_prediction_has_near_zero_dice_loss():
    target = torch.zeros(2, 3, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 50
    assert soft_dice_loss(logits, target, smooth=1e-6).item() == pytest.approx(0, abs=1e-6)


def test_dice_hand_computed():
    # p = 0.5 everywhere, target half ones: inter = 0.5*8 = 4, denom = 8 + 8 = 16
    logits = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    assert soft_dice_loss(logits, target, smooth=0).item() == pytest.approx(1 - 8 / 16)


def test_over_batch_differs_from_per_image_with_empty_class():
    logits = torch.full((2, 1, 4, 4), -3.0)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # image 1 has none of the class
    per_image = soft_dice_loss(logits, target, 1.0, over_batch=False)
    batch = soft_dice_loss(logits, target, 1.0, over_batch=True)
    assert per_image.item() != pytest.approx(batch.item())


def test_weighted_sum_and_soft_targets():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.rand(2, 3, 8, 8)  # soft coverage
    cfg = LossConfig(bce_weight=0.3, dice_weight=0.7)
    loss, parts = BceDiceLoss(cfg)(logits, target)
    assert loss.item() == pytest.approx(0.3 * parts["bce"] + 0.7 * parts["dice"], rel=1e-6)


def test_both_weights_zero_rejected():
    with pytest.raises(ValueError, match="both 0"):
        BceDiceLoss(LossConfig(bce_weight=0, dice_weight=0))
