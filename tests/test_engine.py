"""train_one_epoch logs whatever named parts the loss returns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bonecomp.config import LossConfig
from bonecomp.engine import StepContext, train_one_epoch
from bonecomp.losses import build_loss


def test_metrics_hold_every_loss_part():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 3, padding=1)
    batches = [
        {
            "image": torch.rand(2, 3, 8, 8),
            "mask": (torch.rand(2, 2, 8, 8) > 0.5).float(),
            "index": torch.tensor([2 * i, 2 * i + 1]),
        }
        for i in range(3)
    ]
    loss_fn = build_loss(LossConfig(terms={"bce": 1.0, "focal": 0.5, "jaccard": 0.0}))
    expected = {"loss_bce": 0.0, "loss_focal": 0.0}
    with torch.no_grad():
        for b in batches:
            for k, v in loss_fn(model(b["image"]), b["mask"])[1].items():
                expected[k] += v / len(batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # every batch sees the same weights
    out = train_one_epoch(
        model,
        batches,
        opt,
        SimpleNamespace(step_update=lambda n: None),
        loss_fn,
        StepContext(torch.device("cpu"), progress=False),
        epoch=0,
        num_updates=0,
    )
    assert {"loss", "loss_bce", "loss_focal"} <= set(out) and "loss_jaccard" not in out
    assert "bce" not in out and "dice" not in out
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, rel=1e-5)
    assert out["loss"] == pytest.approx(expected["loss_bce"] + 0.5 * expected["loss_focal"])
    assert out["num_updates"] == 3
