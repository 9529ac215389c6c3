"""TTA, sliding windows, ensembles and thresholds on small synthetic models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bonecomp.inference.ensemble import Ensemble, Member
from bonecomp.inference.sliding import gaussian_weight, sliding_window, tile_starts
from bonecomp.inference.thresholds import choose
from bonecomp.inference.tta import View, tta_mean, views


class Echo(nn.Module):
    """An 'identity' model: the input's first channel, repeated as C logits."""

    def __init__(self, c: int = 29, gain: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.c, self.gain, self.offset = c, gain, offset

    def forward(self, x):
        return (x[:, :1] * self.gain + self.offset).expand(-1, self.c, -1, -1)


class Conv(nn.Module):
    """A small translation-equivariant network (no padding effects at tile borders)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 29, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("flips", [["none"], ["none", "hflip"], ["hflip", "vflip", "hvflip"]])
def test_tta_deaugment_is_identity_for_identity_model(flips):
    x = torch.rand(2, 3, 64, 96)
    got = tta_mean(Echo(), x, views(flips), sigmoid=False)
    assert torch.allclose(got, x[:, :1].expand(-1, 29, -1, -1))


def test_tta_scales_come_back_to_input_size():
    ramp = torch.linspace(0, 1, 64)
    x = (ramp[:, None] * ramp[None, :]).expand(1, 3, 64, 64)  # smooth: resampling is lossless-ish
    v = View(scale=1.5)
    assert v.augment(x).shape[-1] == 96
    got = tta_mean(Echo(), x, [View(), v], sigmoid=False)
    assert got.shape == (1, 29, 64, 64)
    assert torch.allclose(got, x[:, :1].expand(-1, 29, -1, -1), atol=0.02)


def test_unknown_tta_rejected():
    with pytest.raises(ValueError, match="unknown TTA"):
        views(["rot90"])


def test_sliding_window_with_full_tiles_is_plain_forward():
    model = Conv()
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(sliding_window(model, x, tile=64), model(x))
    assert torch.equal(sliding_window(model, x, tile=128), model(x))


def test_sliding_window_of_pointwise_model_equals_forward():
    model = Conv()  # 1x1 conv: every tile sees the same values, so weights cancel out
    x = torch.rand(1, 3, 100, 70)
    got = sliding_window(model, x, tile=32, overlap=0.5)
    assert torch.allclose(got, model(x), atol=1e-5)


def test_tiles_cover_and_weights_peak_in_the_middle():
    assert tile_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert tile_starts(30, 32, 16) == [0]
    w = gaussian_weight((9, 9))
    assert w[4, 4] == 1 and w[0, 0] < w[2, 2] < w[4, 4] and w.min() >= 1e-3


def test_two_model_ensemble_is_the_weighted_mean():
    a, b = Echo(gain=4, offset=-2), Echo(gain=-3, offset=1)
    members = [Member("a", a, 32, 1.0), Member("b", b, 64, 3.0)]
    ens = Ensemble(members, views(["none"]))
    x64 = torch.rand(2, 3, 64, 64)
    x32 = torch.nn.functional.interpolate(x64, size=(32, 32), mode="area")
    got = ens({32: x32, 64: x64})
    pa = torch.sigmoid(a(x32))
    pa = torch.nn.functional.interpolate(pa, size=(64, 64), mode="bilinear", align_corners=False)
    pb = torch.sigmoid(b(x64))
    assert not ens.single_view and got.shape == (2, 29, 64, 64)
    assert torch.allclose(got, (1 * pa + 3 * pb) / 4, atol=1e-6)


def test_single_model_single_view_keeps_logits():
    ens = Ensemble([Member("a", Echo(gain=5), 32)], views(["none"]))
    x = torch.rand(1, 3, 32, 32)
    assert ens.single_view and torch.allclose(ens({32: x}), 5 * x[:, :1].expand(-1, 29, -1, -1))


def test_threshold_choice_keeps_default_unless_clearly_better():
    grid = (0.4, 0.5, 0.6)
    dice = np.array([[0.90, 0.91, 0.95], [0.9105, 0.91, 0.90], [0.5, 0.5, 0.5]])
    res = choose(dice, grid, min_gain=1e-3)
    assert res.thresholds == [0.6, 0.5, 0.5]
    assert res.after.mean >= res.before.mean
    np.testing.assert_allclose(res.after.per_class, [0.95, 0.91, 0.5])
