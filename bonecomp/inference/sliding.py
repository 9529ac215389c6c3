"""Sliding-window prediction over overlapping tiles with Gaussian weighting.

For members trained on patches (``data.patch_size``: windows of their patch side over the
image at their input size, in validation and inference alike) and for whole-image
members whose image does not fit in memory (``infer.sliding_window``): tiles of ``tile`` pixels
step by ``tile * (1 - overlap)``; each tile's output is weighted by a Gaussian centred on
the tile (edges, where context is missing, count less) and the weighted sum is
normalised. With one tile covering the image it is the plain forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gaussian_weight(
    tile: tuple[int, int], sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(th, tw) weights, 1 at the centre, at least 1e-3 at the borders."""
    axes = []
    for n in tile:
        r = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (r / (sigma_scale * n)) ** 2))
    w = axes[0][:, None] * axes[1][None, :]
    return (w / w.max()).clamp_(min=1e-3)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile``; the last one flush."""
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def sliding_window(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: float = 0.25,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Weighted mean of ``predict`` over tiles of x (B, 3, H, W) -> (B, C, H, W) float32."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    B, _, H, W = x.shape
    th, tw = min(tile, H), min(tile, W)
    stride_h, stride_w = max(1, round(th * (1 - overlap))), max(1, round(tw * (1 - overlap)))
    ys, xs = tile_starts(H, th, stride_h), tile_starts(W, tw, stride_w)
    if len(ys) == 1 and len(xs) == 1:
        return predict(x).float()
    weight = gaussian_weight((th, tw), device=x.device)
    out = norm = None
    for y in ys:
        for x0 in xs:
            pred = predict(x[..., y : y + th, x0 : x0 + tw]).float()
            if out is None:
                out = x.new_zeros((B, num_classes or pred.shape[1], H, W), dtype=torch.float32)
                norm = x.new_zeros((H, W), dtype=torch.float32)
            out[..., y : y + th, x0 : x0 + tw] += pred * weight
            norm[y : y + th, x0 : x0 + tw] += weight
    return out / norm
