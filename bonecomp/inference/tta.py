"""Test-time augmentation: a registry of views, each an augment / de-augment pair.

A view transforms the input batch (B, 3, H, W) and maps the model's output (B, C, H', W')
back to the input's geometry, so de-augment(model(augment(x))) equals model(x) for a
model equivariant to it. ``infer.tta`` names registered views; each is crossed with the
scale factors of ``infer.scales`` (``views``). Built-ins: ``none``, ``hflip``, ``vflip``,
``hvflip``, ``rot90`` (a quarter turn of the last two dims, undone by the opposite turn)
and ``transpose`` (H and W swapped, its own inverse). Views that swap H and W work on any
shape: the image is augmented whole (then, with ``infer.sliding_window``, tiled), and the
de-augmented map has the input's shape again.

Add a view from your own code with one call (then ``infer.tta: [none, rot180]`` passes
the config check and inference uses it)::

    from bonecomp.inference.tta import register_view

    register_view("rot180", lambda x: x.rot90(2, (-2, -1)), lambda y: y.rot90(-2, (-2, -1)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bonecomp.registry import Registry

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ViewPair:
    """A registered view: ``augment`` the input, ``deaugment`` the output back."""

    name: str
    augment: Transform
    deaugment: Transform


VIEWS: Registry[ViewPair] = Registry("TTA view", "infer.tta")


def register_view(
    name: str, augment: Transform, deaugment: Transform, *, replace: bool = False
) -> ViewPair:
    """Register ``infer.tta: [name]``: ``augment`` maps the (B, 3, H, W) input, ``deaugment``
    maps the model's (B, C, ., .) output back (it must undo ``augment``'s geometry).

    A name already registered is refused unless ``replace=True``.
    """
    return VIEWS.register(name, ViewPair(name, augment, deaugment), replace=replace)


def view_names() -> list[str]:
    """The valid ``infer.tta`` names, in registration order."""
    return VIEWS.names()


def get_view(name: str, key: str | None = None) -> ViewPair:
    """The registered view; an unknown name is the registry's ``ConfigError`` naming
    ``key`` (default ``infer.tta``) and the valid ones."""
    return VIEWS.get(name, key)


@dataclass(frozen=True)
class View:
    """One TTA view in use: a registered view at a scale factor (input sides rounded to
    ``multiple``)."""

    name: str = "none"
    scale: float = 1.0
    multiple: int = 32
    pair: ViewPair = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pair", get_view(self.name))

    @property
    def label(self) -> str:
        """How logs name it: ``hflip``, or ``hflip@1.5`` at another scale."""
        return self.name if self.scale == 1.0 else f"{self.name}@{self.scale:g}"

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            h, w = x.shape[-2:]
            m = self.multiple
            size = (scaled_side(h, self.scale, m), scaled_side(w, self.scale, m))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.pair.augment(x)

    def deaugment(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.pair.deaugment(y)
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


def views(names: Sequence[str] = ("none",), scales: Sequence[float] = (1.0,)) -> list[View]:
    """All combinations of the named views and scale factors (an unknown name: the
    ``get_view`` error)."""
    if not names or not scales or any(s <= 0 for s in scales):
        raise ValueError(f"TTA needs at least one view and positive scales, got {names}, {scales}")
    return [View(n, float(s)) for s in scales for n in names]


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


def scaled_side(side: int, scale: float, multiple: int = 32) -> int:
    """A side at a TTA ``scale``, rounded to ``multiple`` (what the network is then fed)."""
    return max(multiple, round(side * scale / multiple) * multiple)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _flip(*dims: int) -> Transform:
    return lambda x: x.flip(dims)


def _rot90(k: int) -> Transform:
    return lambda x: x.rot90(k, (-2, -1))


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


register_view("none", _identity, _identity)
register_view("hflip", _flip(-1), _flip(-1))
register_view("vflip", _flip(-2), _flip(-2))
register_view("hvflip", _flip(-2, -1), _flip(-2, -1))
register_view("rot90", _rot90(1), _rot90(-1))
register_view("transpose", _transpose, _transpose)
