"""TTA, sliding windows, ensembles and thresholds on small synthetic models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bonecomp.checks import check_config
from bonecomp.config import ConfigError, InferConfig, load_config
from bonecomp.inference.ensemble import Ensemble, Member, infer_ensemble
from bonecomp.inference.sliding import gaussian_weight, sliding_window, tile_starts
from bonecomp.inference.thresholds import choose
from bonecomp.inference.tta import View, register_view, tta_mean, view_names, views

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


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
    with pytest.raises(
        ConfigError, match=r"^infer\.tta: unknown TTA view 'rot45'; valid: none, hflip,"
    ):
        views(["rot45"])


class Ramp(nn.Module):
    """Position-dependent: the input's first channel plus a ramp that grows down the rows
    and (differently) along the columns, so no flip, rotation or transpose leaves it be."""

    def forward(self, x):
        h, w = x.shape[-2:]
        rows = torch.arange(h, dtype=x.dtype)[:, None] / h
        cols = torch.arange(w, dtype=x.dtype)[None, :] / w
        return (x[:, :1] + 2 * rows + 0.5 * cols + rows * cols).expand(-1, 29, -1, -1)


# Each built-in view as plain torch: (augment, de-augment).
BUILTIN = {
    "none": (lambda t: t, lambda t: t),
    "hflip": (lambda t: t.flip(-1), lambda t: t.flip(-1)),
    "vflip": (lambda t: t.flip(-2), lambda t: t.flip(-2)),
    "hvflip": (lambda t: t.flip(-2, -1), lambda t: t.flip(-2, -1)),
    "rot90": (lambda t: torch.rot90(t, 1, (-2, -1)), lambda t: torch.rot90(t, -1, (-2, -1))),
    "transpose": (lambda t: t.transpose(-2, -1), lambda t: t.transpose(-2, -1)),
}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_view_is_its_transform_and_undoes_it(name):
    """Equivariant model: the view gives back model(x); position-dependent model: the view
    gives de-augment(model(augment(x))), which differs from model(x) for all but none. A
    view whose augment or de-augment did nothing would fail one of the two."""
    assert name in view_names()
    x = torch.rand(2, 3, 64, 96)  # not square: rot90 and transpose swap the sides
    view = [View(name)]
    assert torch.equal(tta_mean(Echo(), x, view, sigmoid=False), Echo()(x))
    aug, deaug = BUILTIN[name]
    got = tta_mean(Ramp(), x, view, sigmoid=False)
    assert got.shape == (2, 29, 64, 96)
    assert torch.equal(got, deaug(Ramp()(aug(x))))
    assert torch.equal(got, Ramp()(x)) == (name == "none")


def test_views_that_swap_the_sides_work_with_sliding_windows_on_any_shape():
    model = Conv()  # pointwise: equivariant to every view, tile by tile
    x = torch.rand(1, 3, 64, 96)
    tiles = []

    def windowed(t):
        return sliding_window(lambda tile: tiles.append(tile.shape[-2:]) or model(tile), t, 32)

    got = tta_mean(windowed, x, views(["rot90", "transpose"]), sigmoid=False)
    assert torch.allclose(got, model(x), atol=1e-5)
    assert set(tiles) == {(32, 32)}  # the whole image is turned first, then tiled


@pytest.fixture
def roll_view(registries):
    """A view registered as user code would, in a registry restored afterwards."""
    calls = []

    def augment(x):
        calls.append(tuple(x.shape))
        return x.roll(5, -1)

    register_view("roll", augment, lambda y: y.roll(-5, -1))
    return calls


def test_registered_view_passes_the_config_check(roll_view):
    check_config(load_config(BASE, ["infer.tta=[none, roll]"]))
    with pytest.raises(ConfigError) as info:
        check_config(load_config(BASE, ["infer.tta=[none, rol]"]))
    assert info.value.key == "infer.tta[1]"
    assert str(info.value) == (
        "command line: infer.tta[1]: unknown TTA view 'rol'; valid: none, hflip, vflip, "
        "hvflip, rot90, transpose, roll"
    )
    with pytest.raises(ValueError, match="already registered"):
        register_view("roll", lambda x: x, lambda y: y)


def test_registered_view_is_used_by_the_ensemble(roll_view):
    ens = infer_ensemble([Member("a", Ramp(), 32)], InferConfig(tta=["none", "roll"]))
    assert [v.label for v in ens.tta] == ["none", "roll"]
    x = torch.rand(2, 3, 32, 32)
    got = ens({32: x})
    assert roll_view == [(2, 3, 32, 32)]
    rolled = Ramp()(x.roll(5, -1)).roll(-5, -1)
    assert torch.allclose(got, (torch.sigmoid(Ramp()(x)) + torch.sigmoid(rolled)) / 2)
    assert not torch.allclose(got, torch.sigmoid(Ramp()(x)))


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
