"""Streaming soft-vote ensembles: any mix of checkpoints, each at its own input size.

Per batch of test images, every member runs at its own training geometry, read from its
checkpoint: the whole image at its ``image_size``, or, trained on patches
(``data.patch_size``), Gaussian-blended windows of its patch side over the image at its
``image_size`` (``infer.overlap``), so a patch member adds the resolution it was trained
at. TTA views apply to the whole image, then the windows (flip, then tile: each tile is
predicted once per view). ``infer.sliding_window`` tiles whole-image members too
(``infer.tile``, to bound memory). Each member's sigmoid probabilities are brought to a
common grid (the largest member size) and averaged with the members' weights: one number
per member, or one per class (class-wise weights tuned on OOF,
``inference.class_weights``), normalised per class. Only one batch of probabilities is
ever in memory, whatever the number of test images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bonecomp.checkpoint import load_checkpoint, load_weights
from bonecomp.config import ConfigError, InferConfig, config_from_saved
from bonecomp.data.preprocess import NONE, Preprocess
from bonecomp.device import amp_dtype, resolve_channels_last
from bonecomp.extensions import import_extensions
from bonecomp.inference.sliding import sliding_window
from bonecomp.inference.tta import View, tta_mean, views
from bonecomp.models import create_model
from bonecomp.runs import crop_stage_error


@dataclass
class Member:
    """One model of the ensemble, as its checkpoint describes it."""

    name: str
    model: nn.Module
    input_size: int
    weight: float | torch.Tensor = 1.0  # a scalar, or (C,) weights per class (>= 0)
    preprocess: Preprocess = NONE  # its run's data.preprocess, from its checkpoint
    patch_size: int | None = None  # trained on patches of this side: windows of it

    @property
    def input_key(self) -> int | str:
        """The key of its images in the ensemble's input dict (``Preprocess.key``)."""
        return self.preprocess.key(self.input_size)


def load_member(
    path: Path | str,
    weight: float | torch.Tensor = 1.0,
    device: torch.device | str = "cpu",
    crop: bool = False,
) -> Member:
    """Rebuild a model from a checkpoint alone (architecture, geometry and preprocessing
    from its config, never from the inference config: a checkpoint older than patch
    training has no ``patch_size`` and its config none). A model trained on the carpal
    box (``data.crop``) is refused unless ``crop`` (the crop stage's members), in the
    words threshold tuning uses (``runs.crop_stage_error``)."""
    ckpt = load_checkpoint(path, "cpu")
    cfg = config_from_saved(ckpt["config"], where=str(path))
    if cfg.data.crop and not crop:
        raise crop_stage_error(Path(path).parent)
    cfg.model.encoder_weights = None  # the checkpoint holds the weights; never download
    cfg.model.init_bias = None
    try:  # the run's registered architecture may live in its extensions
        import_extensions(cfg.extensions)
        model = create_model(cfg.model)
    except ConfigError as e:
        raise ConfigError(f"{path} (the run's config): {e}", e.key) from None
    load_weights(model, ckpt["model"], path)
    device = torch.device(device)
    nhwc = resolve_channels_last("auto", device)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    model = model.eval().to(device, memory_format=fmt)
    weight = weight.float().to(device) if isinstance(weight, torch.Tensor) else float(weight)
    patch = ckpt.get("patch_size", cfg.data.patch_size)
    prep = Preprocess.of(cfg.data)
    return Member(str(path), model, int(ckpt["input_size"]), weight, prep, patch and int(patch))


class Ensemble:
    """Weighted mean of members' TTA-averaged probabilities on a common grid."""

    def __init__(
        self,
        members: Sequence[Member],
        tta: Sequence[View],
        tile: int | None = None,
        overlap: float = 0.25,
        amp: bool = True,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        scalars = [m.weight for m in members if not isinstance(m.weight, torch.Tensor)]
        if any(not w > 0 for w in scalars):
            raise ValueError("ensemble weights must be positive")
        tensors = [m.weight for m in members if isinstance(m.weight, torch.Tensor)]
        if tensors:
            if len({tuple(w.shape) for w in tensors}) != 1 or tensors[0].ndim != 1:
                raise ValueError("class-wise ensemble weights must all have shape (C,)")
            if any(not (torch.isfinite(w).all() and (w >= 0).all()) for w in tensors):
                raise ValueError("class-wise ensemble weights must be finite and >= 0")
            if not (sum(tensors) + sum(scalars) > 0).all():
                raise ValueError("class-wise ensemble weights: some class has no weight")
        self.members, self.tta, self.tile, self.overlap, self.amp = members, tta, tile, overlap, amp
        self.size = max(m.input_size for m in members)
        self.sizes = sorted({m.input_size for m in members})
        # (size, preprocessing) of each distinct input the members take (TestImages)
        pairs = {(m.input_size, m.preprocess) for m in members}
        self.inputs = sorted(pairs, key=lambda p: (p[0], p[1].label))

    @property
    def single_view(self) -> bool:
        """One model per class, one view: keep logits so the result is the baseline's
        definition (class-wise weights with all of a class's weight on one member select
        that member's logits for it)."""
        if len(self.tta) != 1:
            return False
        if len(self.members) == 1:
            return True
        per_class = [m.weight > 0 for m in self.members if isinstance(m.weight, torch.Tensor)]
        return len(per_class) == len(self.members) and bool((sum(per_class) == 1).all())

    @torch.no_grad()
    def __call__(self, images: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, C, S, S) on the common grid: logits if ``single_view`` else probabilities.

        ``images[key]`` is the (B, 3, size, size) float batch in [0, 1] for each member's
        ``input_key``: its size, or ``"<size>-<label>"`` with preprocessing.
        """
        total, weights = None, 0.0
        for m in self.members:
            x = images[m.input_key]
            y = tta_mean(self._predictor(m, x.device), x, self.tta, sigmoid=not self.single_view)
            if y.shape[-1] != self.size:
                y = F.interpolate(
                    y, size=(self.size, self.size), mode="bilinear", align_corners=False
                )
            w = m.weight
            if isinstance(w, torch.Tensor):
                w = w.to(y.device).view(1, -1, 1, 1)
                y = torch.where(w > 0, y * w, 0.0)  # a zero weight ignores even inf logits
                total = y if total is None else total.add_(y)
            else:
                total = y * w if total is None else total.add_(y, alpha=w)
            weights = weights + w
        return total / weights

    def _predictor(self, m: Member, device: torch.device):
        run = self._forward(m, device)
        tile = m.patch_size or self.tile
        if tile and tile < m.input_size:
            return lambda x: sliding_window(run, x, tile, self.overlap)
        return run

    def _forward(self, m: Member, device: torch.device):
        """One forward of member ``m``: the device's memory format, autocast, float32
        logits (``bonecomp.plan`` runs the same on fake tensors)."""
        fmt = (
            torch.channels_last
            if resolve_channels_last("auto", device)
            else torch.contiguous_format
        )

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=fmt)
            with self._autocast(device):
                return m.model(x).float()

        return run

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = amp_dtype(device, self.amp)
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def infer_ensemble(models: Sequence[Member], inf: InferConfig) -> Ensemble:
    """``models`` run as the ``infer`` section says: TTA views and scales, sliding window,
    AMP and ``torch.compile``."""
    if inf.compile:
        for m in models:
            m.model = torch.compile(m.model)
    tile = inf.tile if inf.sliding_window else None
    return Ensemble(models, views(inf.tta, inf.scales), tile, inf.overlap, inf.amp)
