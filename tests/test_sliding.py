"""Sliding windows blend overlapping tiles with Gaussian weights, not any weights.

A model whose output is the same everywhere in a tile cannot tell weightings apart (every
weighted mean of equal values is that value). Here the predictor returns the tile's own
offset, so each pixel's result is a weighted mean of *different* values: it equals the
analytic Gaussian-weighted mean, and differs from the uniform one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecomp.inference import sliding
from bonecomp.inference.sliding import sliding_window


def coordinates(b: int, h: int, w: int) -> torch.Tensor:
    """(b, 3, h, w): channel 0 the row index, channel 1 the column index."""
    x = torch.zeros(b, 3, h, w)
    x[:, 0] = torch.arange(h, dtype=torch.float32)[:, None]
    x[:, 1] = torch.arange(w, dtype=torch.float32)[None, :]
    return x


def tile_offset(tile: torch.Tensor) -> torch.Tensor:
    """(B, 2, th, tw): the tile's top-left (row, column), constant over the tile."""
    corner = tile[:, :2, :1, :1]
    return corner.expand(-1, -1, *tile.shape[-2:]).clone()


def gaussian(n: int, sigma_scale: float = 0.125) -> np.ndarray:
    r = np.arange(n) - (n - 1) / 2
    return np.exp(-0.5 * (r / (sigma_scale * n)) ** 2)


def expected(h: int, w: int, tile: int, overlap: float, uniform: bool = False) -> np.ndarray:
    """(2, h, w) weighted mean of the tile offsets, written out from the definition."""
    th, tw = min(tile, h), min(tile, w)
    weight = np.outer(gaussian(th), gaussian(tw))
    weight = np.maximum(weight / weight.max(), 1e-3)
    if uniform:
        weight = np.ones_like(weight)

    def starts(n: int, t: int) -> list[int]:
        step = max(1, round(t * (1 - overlap)))
        return sorted({*range(0, max(n - t, 0), step), max(n - t, 0)})

    num, den = np.zeros((2, h, w)), np.zeros((h, w))
    for y in starts(h, th):
        for x in starts(w, tw):
            num[0, y : y + th, x : x + tw] += weight * y
            num[1, y : y + th, x : x + tw] += weight * x
            den[y : y + th, x : x + tw] += weight
    return num / den


@pytest.mark.parametrize("h, w, tile, overlap", [(100, 70, 32, 0.5), (64, 96, 40, 0.25)])
def test_blend_is_the_gaussian_weighted_mean(h, w, tile, overlap):
    got = sliding_window(tile_offset, coordinates(2, h, w), tile, overlap).numpy()
    want = expected(h, w, tile, overlap)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-4)
    # the case discriminates: uniform weights give a visibly different blend
    assert np.abs(expected(h, w, tile, overlap, uniform=True) - want).max() > 1


def test_uniform_weights_fail_the_check(monkeypatch):
    h, w, tile, overlap = 100, 70, 32, 0.5
    monkeypatch.setattr(sliding, "gaussian_weight", lambda t, *a, **k: torch.ones(t))
    got = sliding_window(tile_offset, coordinates(1, h, w), tile, overlap).numpy()[0]
    np.testing.assert_allclose(got, expected(h, w, tile, overlap, uniform=True), atol=1e-4)
    assert not np.allclose(got, expected(h, w, tile, overlap), atol=1e-4)
