"""Multilabel segmentation losses by name: a weighted sum of terms (``loss.terms``).

A term is called ``term(logits, batch) -> scalar tensor``: ``logits`` are the model's
(B, C, H, W) output in float32 (also under autocast) and ``batch`` is the dict the
dataset yields, on the device (``engine.to_device``): ``batch["mask"]`` holds the
targets as float in [0, 1] (soft: fractional coverage). A per-pixel input made in the
dataset (a distance map, a boundary band, an ignore mask) is a sample field
(``bonecomp.data.sample.register_field``) that the term declares it reads,
``register_loss(name, builder, fields=("distance",))``: every item of training and
validation then carries it as ``batch["distance"]``, and only while a configured term
reads it.

``TERMS`` is the registry of terms (each a builder ``(LossConfig) -> term`` and the
fields it reads); ``register_loss`` adds one, from the package or from user code, and the
config check, training and the summary log (``loss_<name>``) take it with no other edit::

    @register_loss("weighted_bce")
    def weighted_bce(cfg: LossConfig):
        def term(logits, batch):
            return F.binary_cross_entropy_with_logits(
                logits, batch["mask"], weight=batch["weight"]
            )
        return term

Built in: ``bce`` (torch), ``dice`` (ours, below), and ``focal``, ``jaccard``,
``lovasz``, ``tversky`` from segmentation_models_pytorch (mode "multilabel", from
logits); each reads ``batch["mask"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from torch import nn

from bonecomp.config import ConfigError, LossConfig
from bonecomp.registry import Registry

Batch = Mapping[str, torch.Tensor]
Term = Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits, batch) -> scalar
TermBuilder = Callable[[LossConfig], Term]


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


class SoftDiceLoss(nn.Module):
    """Our soft Dice, kept instead of ``smp.losses.DiceLoss``: smp zeroes the loss of a
    class absent from the batch (so false positives there cost nothing) and has no
    per-image mode; with ``smooth`` > 0 ours still pushes such predictions down."""

    def __init__(self, smooth: float = 1.0, over_batch: bool = True) -> None:
        super().__init__()
        self.smooth, self.over_batch = smooth, over_batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, target, self.smooth, self.over_batch)


class OnMask(nn.Module):
    """A ``loss(logits, target)`` as a term: its target is ``batch["mask"]`` (float32)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss(logits, batch["mask"].float())


class _Plain(nn.Module):
    """A term that is a plain function, held like the module terms."""

    def __init__(self, fn: Term) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.fn(logits, batch)


@dataclass(frozen=True)
class LossTerm:
    """A registered loss term: its builder from the loss config and the sample fields
    (``bonecomp.data.sample.FIELDS``) it reads besides image, mask and index."""

    build: TermBuilder
    fields: tuple[str, ...] = ()


# name -> term (``loss.terms``); an unknown name lists these.
TERMS: Registry[LossTerm] = Registry("loss term", "loss.terms")


def register_loss(
    name: str,
    builder: TermBuilder | None = None,
    *,
    fields: Sequence[str] = (),
    replace: bool = False,
):
    """Add the term ``name`` to ``TERMS``: ``register_loss(name, builder)``, or
    ``@register_loss(name)`` over the builder. Returns the builder.

    ``builder(cfg: LossConfig)`` returns the term, called ``term(logits, batch)`` (see
    the module docstring); ``loss.terms: {name: weight}`` then selects it. ``fields``
    names the sample fields beyond image, mask and index that the term reads from
    ``batch`` (registered with ``bonecomp.data.sample.register_field``): the datasets
    make them while the term is configured. A name already registered is refused
    (``ValueError``) unless ``replace=True``.
    """
    if isinstance(fields, str):
        raise TypeError(f"loss term {name!r}: fields must be a sequence of names, got {fields!r}")

    def add(b: TermBuilder) -> TermBuilder:
        TERMS.register(name, LossTerm(b, tuple(fields)), replace=replace)
        return b

    return add if builder is None else add(builder)


def term_fields(cfg: LossConfig) -> dict[str, tuple[str, ...]]:
    """{term: the sample fields it reads} of the configured terms (weight > 0)."""
    return {
        name: TERMS.get(name).fields if name in TERMS else ()
        for name, w in cfg.terms.items()
        if w > 0
    }


def loss_fields(cfg: LossConfig) -> tuple[str, ...]:
    """The sample fields the configured loss reads, each once, in the order of the terms:
    what the training and validation items must carry besides the built-in ones."""
    return tuple(dict.fromkeys(f for names in term_fields(cfg).values() for f in names))


MULTILABEL = smp.losses.MULTILABEL_MODE

register_loss("bce", lambda c: OnMask(nn.BCEWithLogitsLoss()))
register_loss("dice", lambda c: OnMask(SoftDiceLoss(c.dice_smooth, c.dice_over_batch)))
register_loss("focal", lambda c: OnMask(smp.losses.FocalLoss(MULTILABEL, gamma=c.focal_gamma)))
register_loss("jaccard", lambda c: OnMask(smp.losses.JaccardLoss(MULTILABEL, from_logits=True)))
register_loss("lovasz", lambda c: OnMask(smp.losses.LovaszLoss(MULTILABEL, from_logits=True)))
register_loss(
    "tversky",
    lambda c: OnMask(
        smp.losses.TverskyLoss(
            MULTILABEL, from_logits=True, alpha=c.tversky_alpha, beta=c.tversky_beta
        )
    ),
)


def check_loss_config(cfg: LossConfig) -> None:
    """Raise ``ConfigError`` (key ``loss.terms``) for an unknown or unusable term."""
    for name in cfg.terms:
        TERMS.get(name)  # an unknown one: the registry's one line
    if any(w < 0 for w in cfg.terms.values()) or not any(w > 0 for w in cfg.terms.values()):
        raise ConfigError(
            f"loss.terms: weights must be >= 0 and one > 0, got {cfg.terms}", "loss.terms"
        )


class WeightedLoss(nn.Module):
    """``sum(weight * term(logits, batch))`` over the terms with a weight > 0.

    ``forward(logits, batch)`` returns ``(total, parts)``; ``parts`` holds each
    unweighted term as a float under ``loss_<term>`` (never a bare ``dice``, which reads
    like ``val_dice``). The logits reach every term in float32.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or LossConfig()
        check_loss_config(cfg)
        self.weights = {name: float(w) for name, w in cfg.terms.items() if w > 0}
        built = {name: TERMS.get(name).build(cfg) for name in self.weights}
        self.terms = nn.ModuleDict(
            {n: t if isinstance(t, nn.Module) else _Plain(t) for n, t in built.items()}
        )

    def forward(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = logits.float()
        total = logits.new_zeros(())
        parts = {}
        for name, term in self.terms.items():
            value = term(logits, batch)
            total = total + self.weights[name] * value
            parts[f"loss_{name}"] = float(value.detach())
        return total, parts


def build_loss(cfg: LossConfig) -> nn.Module:
    """The configured loss: ``loss_fn(logits, batch) -> (total, {"loss_<term>": float})``."""
    return WeightedLoss(cfg)
