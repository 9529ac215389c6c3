"""The competition Dice: counts, numpy/torch agreement, empty masks, a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecomp.metrics import (
    SMOOTH,
    DiceAccumulator,
    dice_counts,
    dice_from_counts,
    dice_from_counts_torch,
    summarize,
)
from bonecomp.testing import dense_dice


def test_hand_computed_case():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 pixels
    gt[0, 1:] = True  # 3 pixels, 2 shared
    inter, p, g = dice_counts(pred, gt)
    assert (inter, p, g) == (2, 3, 3)
    assert dice_from_counts(inter, p, g) == pytest.approx((4 + SMOOTH) / (6 + SMOOTH), abs=1e-15)


def test_empty_prediction_of_empty_truth_scores_one():
    assert dice_from_counts(0, 0, 0) == 1.0
    assert dice_from_counts(0, 5, 0) == pytest.approx(SMOOTH / (5 + SMOOTH))


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    pred = rng.random((3, 29, 32, 32)) < 0.3
    gt = rng.random((3, 29, 32, 32)) < 0.3
    gt[0, 0] = pred[0, 0] = False  # an empty/empty pair
    n = dice_from_counts(*dice_counts(pred, gt))
    t = dice_from_counts_torch(*(torch.from_numpy(c) for c in dice_counts(pred, gt)))
    assert t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), n, rtol=0, atol=1e-9)
    assert n[0, 0] == 1.0


def test_mean_over_images_then_classes():
    dice = np.array([[1.0, 0.5], [0.0, 0.5]])
    table = summarize(dice)
    np.testing.assert_allclose(table.per_class, [0.5, 0.5])
    assert table.mean == 0.5


def test_accumulator_matches_summarize():
    rng = np.random.default_rng(1)
    pred = rng.random((6, 29, 16, 16)) < 0.4
    gt = rng.random((6, 29, 16, 16)) < 0.4
    acc = DiceAccumulator(29)
    for b in range(0, 6, 4):  # batches of 4 and 2
        acc.update(*(torch.from_numpy(c) for c in dice_counts(pred[b : b + 4], gt[b : b + 4])))
    got = acc.compute()
    want = summarize(dense_dice(pred, gt))  # the kit's independent full-mask reference
    np.testing.assert_allclose(got.per_class, want.per_class, atol=1e-12)
    assert got.n_images == 6
