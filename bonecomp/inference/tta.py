"""Test-time augmentation as augment / de-augment pairs.

Each view transforms the input batch and maps the model's output back to the input's
geometry, so de-augment(model(augment(x))) equals model(x) for an equivariant model.
Views: flips (``none``, ``hflip``, ``vflip``) crossed with scale factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLIPS = {"none": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}


@dataclass(frozen=True)
class View:
    """One TTA view: flip dims and a scale factor (input sides rounded to ``multiple``)."""

    flip: tuple[int, ...] = ()
    scale: float = 1.0
    multiple: int = 32

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            h, w = x.shape[-2:]
            size = (_round(h * self.scale, self.multiple), _round(w * self.scale, self.multiple))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.flip(self.flip) if self.flip else x

    def deaugment(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = y.flip(self.flip) if self.flip else y
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


def views(flips: Sequence[str] = ("none",), scales: Sequence[float] = (1.0,)) -> list[View]:
    """All combinations of the named flips and scale factors."""
    unknown = [f for f in flips if f not in FLIPS]
    if unknown:
        raise ValueError(f"unknown TTA {unknown}; valid: {sorted(FLIPS)}")
    if not flips or not scales or any(s <= 0 for s in scales):
        raise ValueError(f"TTA needs at least one flip and positive scales, got {flips}, {scales}")
    return [View(FLIPS[f], float(s)) for s in scales for f in flips]


def tta_mean(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tta: Sequence[View],
    sigmoid: bool = True,
) -> torch.Tensor:
    """Mean over views of the de-augmented outputs (sigmoid probabilities by default)."""
    size = tuple(x.shape[-2:])
    total = None
    for v in tta:
        y = v.deaugment(predict(v.augment(x)).float(), size)
        y = torch.sigmoid(y) if sigmoid else y
        total = y.clone() if total is None else total.add_(y)  # y may be a view of the input
    return total / len(tta)


def _round(v: float, multiple: int) -> int:
    return max(multiple, round(v / multiple) * multiple)
