"""Second stage on the carpal box: a crop model's carpal probabilities pasted into the
first stage's, exactly at the source size and one image at a time.

For one image with first-stage map ``x`` (C, h, w) (logits or probabilities) and a
crop map ``y`` over the box ``(y0, y1, x0, x1)`` the result is, by definition,

    P = sigmoid(up(x, (H, W)))      (or up(x) for probabilities), every class
    Q = sigmoid(up(y[carpals], box size))                      the crop's carpals
    P[c, box] = lerp(P[c, box], Q[c], w_c)                 for each carpal class c
    mask = P > t

with ``up`` bilinear (align_corners=False). Only the box's rows of the eight carpal
channels are ever made as floats (``postprocess.upsampled_rows`` gives them bit for
bit); everything else is ``upsample_threshold``'s sparse masks, untouched. ``lerp`` keeps
``P`` exactly where the crop echoes it (``Q == P``) or its weight is 0, and takes ``Q``
exactly at weight 1. The box comes from the first stage's carpal pixels
(``data.carpal_box.grid_box``), the same rule the crop model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bonecomp.classes import CARPALS
from bonecomp.config import Config
from bonecomp.data.carpal_box import Box, crop_image, grid_box
from bonecomp.data.dataset import to_float_image
from bonecomp.data.images import read_image
from bonecomp.data.truth import GroundTruth
from bonecomp.inference.ensemble import Ensemble, infer_ensemble, load_member
from bonecomp.inference.oof import OofRow, RunOOF, open_oof
from bonecomp.inference.postprocess import (
    SparseMask,
    SparseMasks,
    as_thresholds,
    overlap_counts,
    trim,
    upsample_threshold,
    upsampled_rows,
)
from bonecomp.inference.thresholds import experiment_weights, oof_maps_by_image, weighted_mean
from bonecomp.memory import BatchMemoryError, free_memory
from bonecomp.metrics import dice_from_counts
from bonecomp.runs import MemberSpec, RunError, crop_members


def prediction_box(
    pred: torch.Tensor, hw: tuple[int, int], logits: bool, threshold: float, margin: float
) -> Box | None:
    """The crop box of a first-stage map (C, h, w): its carpal pixels over ``threshold``."""
    cut = math.log(threshold / (1 - threshold)) if logits else threshold
    flags = (pred[list(CARPALS)] > cut).any(0).cpu().numpy()
    return grid_box(flags, hw, margin)


def paste_crop(
    full: torch.Tensor,
    hw: tuple[int, int],
    thresholds: float | Sequence[float],
    logits: bool,
    box: Box | None,
    crop: torch.Tensor | None,
    crop_logits: bool,
    weights: Sequence[float],
) -> SparseMasks:
    """The masks of the module docstring's definition; ``crop`` is (C, hc, wc) with all
    classes (only the carpals are used) and ``weights`` one per carpal. No box: the first
    stage's masks."""
    masks = upsample_threshold(full, hw, thresholds, logits)
    if box is None or crop is None:
        return masks
    ts = as_thresholds(thresholds, full.shape[0])
    p, q = carpal_probs(full, hw, logits, box, crop, crop_logits)
    return blend(masks, p, q, box, ts, weights)


def carpal_probs(
    full: torch.Tensor,
    hw: tuple[int, int],
    logits: bool,
    box: Box,
    crop: torch.Tensor,
    crop_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first stage's, crop's) carpal probabilities in the box at the source size, each
    (8, box h, box w): the first stage's bit for bit as the full upsample gives them."""
    y0, y1, x0, x1 = box
    q = F.interpolate(
        crop[None, list(CARPALS)].float().to(full.device),
        size=(y1 - y0, x1 - x0),
        mode="bilinear",
        align_corners=False,
    )[0]
    if crop_logits:
        q = torch.sigmoid(q)
    p = torch.empty_like(q)
    for k, c in enumerate(CARPALS):
        rows = upsampled_rows(full[c], y0, y1, hw)
        p[k] = (torch.sigmoid(rows) if logits else rows)[:, x0:x1]
    return p, q


def blend(
    masks: SparseMasks,
    p: torch.Tensor,
    q: torch.Tensor,
    box: Box,
    thresholds: Sequence[float],
    weights: Sequence[float],
) -> SparseMasks:
    """A copy of the first stage's ``masks`` with each carpal's box replaced by
    ``lerp(p, q, w) > t`` (a weight of 0 keeps the first stage's mask)."""
    out = SparseMasks(masks.shape, list(masks.masks))
    for k, c in enumerate(CARPALS):
        if weights[k] == 0:
            continue  # exactly the first stage's mask
        inside = torch.lerp(p[k].contiguous(), q[k].contiguous(), float(weights[k]))
        out.masks[c] = replace_box(out.masks[c], box, inside > thresholds[c])
    return out


def replace_box(mask: SparseMask, box: Box, inside: torch.Tensor) -> SparseMask:
    """``mask`` with the box's pixels replaced by ``inside`` (box-sized bool)."""
    y0, y1, x0, x1 = box
    h, w = mask.crop.shape
    have = mask.crop.numel() > 0
    uy0, ux0 = (min(mask.y0, y0), min(mask.x0, x0)) if have else (y0, x0)
    uy1, ux1 = (max(mask.y0 + h, y1), max(mask.x0 + w, x1)) if have else (y1, x1)
    canvas = torch.zeros((uy1 - uy0, ux1 - ux0), dtype=torch.bool, device=inside.device)
    if have:
        canvas[mask.y0 - uy0 : mask.y0 - uy0 + h, mask.x0 - ux0 : mask.x0 - ux0 + w] = mask.crop
    canvas[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0] = inside
    return trim(canvas if canvas.is_cuda else canvas.numpy(), uy0, ux0)


@dataclass
class CarpalStage:
    """The loaded crop ensemble and how its output is pasted (``infer.crop``)."""

    ensemble: Ensemble
    margin: float
    threshold: float
    weights: list[float]  # one per carpal

    def masks(
        self,
        pred: torch.Tensor,
        logits: bool,
        image_path: str,
        hw: tuple[int, int],
        thresholds: Sequence[float],
    ) -> tuple[SparseMasks, Box | None]:
        """One image's final masks from its first-stage map ``pred`` (C, h, w), and the box
        (None: no carpal pixel, the first stage's masks)."""
        box = prediction_box(pred, hw, logits, self.threshold, self.margin)
        if box is None:
            return upsample_threshold(pred, hw, thresholds, logits), None
        image = read_image(image_path)
        dev = pred.device
        prepared = {p: p(image) for _, p in self.ensemble.inputs}  # each member's preprocess
        inputs = {
            p.key(s): to_float_image(
                torch.from_numpy(crop_image(prepared[p], box, s))[None].to(dev)
            )
            for s, p in self.ensemble.inputs
        }
        crop = self._forward(inputs, dev)
        single = self.ensemble.single_view
        return paste_crop(pred, hw, thresholds, logits, box, crop, single, self.weights), box

    def _forward(self, inputs: dict[int | str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The crop ensemble on one crop. It is one image already, so running out of
        memory cannot halve anything: one line says what to change."""
        try:
            return self.ensemble(inputs)[0]
        except torch.OutOfMemoryError:
            pass  # freed outside the except: its traceback pins the forward's tensors
        free_memory(device)
        raise BatchMemoryError(f"out of memory in the crop stage on one crop; {CROP_OOM_HINT}")


CROP_OOM_HINT = (
    "set infer.sliding_window=true with a lower infer.tile, use fewer infer.scales, "
    "or infer.crop.experiment=null to go without the crop stage"
)


def load_crop_stage(cfg: Config, device: torch.device) -> CarpalStage | None:
    """The crop stage of ``infer.crop`` (None when ``infer.crop.experiment`` is null).

    The experiment must have been trained on crops (``data.crop``); its margin is its
    ``data.crop_margin`` unless ``infer.crop.margin`` says otherwise.
    """
    spec = cfg.infer.crop
    members = crop_members(cfg)
    if not members:
        return None
    run = members[0].run
    data = run.saved_config().data if run.config.is_file() else None
    if data is None or data.crop is None:
        raise RunError(
            f"infer.crop.experiment {spec.experiment!r} was not trained on crops "
            f"({run.config} has no data.crop); train one with data.crop=carpal "
            "(configs/carpal_crop_1024.yaml)"
        )
    margin = spec.margin if spec.margin is not None else data.crop_margin
    weights = [spec.weight] * len(CARPALS) if isinstance(spec.weight, float) else list(spec.weight)
    models = [load_member(m.checkpoint, weight=1.0, device=device, crop=True) for m in members]
    return CarpalStage(infer_ensemble(models, cfg.infer), margin, spec.threshold, weights)


# ----------------------------------------------------------------------------- OOF
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # 0: without the crop stage


@dataclass
class CropOOF:
    """Carpal OOF Dice of the first stage with the crop stage pasted at each weight."""

    grid: tuple[float, ...]
    dice: np.ndarray  # (8, G): mean Dice per carpal (classes.CARPALS order) and weight
    n_images: int

    @property
    def without(self) -> np.ndarray:
        return self.dice[:, self.grid.index(0.0)]

    def at(self, weight: float) -> np.ndarray:
        return self.dice[:, self.grid.index(weight)]

    def tuned(self, min_gain: float = 1e-3) -> list[float]:
        """Per carpal the best weight; 0 (no crop) unless another beats it by ``min_gain``."""
        best = self.dice.argmax(axis=1)
        gain = self.dice[np.arange(len(best)), best] - self.without
        return [
            float(self.grid[b]) if g > min_gain else 0.0 for b, g in zip(best, gain, strict=True)
        ]


def crop_oof_dice(
    first: Sequence[MemberSpec],
    crop: Sequence[MemberSpec],
    truth: GroundTruth | Path | str,
    thresholds: Sequence[float],
    grid: Sequence[float] = WEIGHT_GRID,
    progress: bool = True,
    class_weights: dict[str, Sequence[float]] | None = None,
) -> CropOOF:
    """Carpal Dice at the source size on the OOF images both stages predicted: the first
    stage's OOF map (its members' weighted mean, per class with ``class_weights``) with
    the crop experiment's OOF map pasted into the box it was predicted on, for each crop
    weight of ``grid`` (0 = without).

    The crop OOF was predicted on the truth's carpal box (jittered boxes are training
    only), so this measures the crop model given a good box; at inference the box comes
    from the first stage's carpals. ``truth``: the first stage's truth polygons
    (``GroundTruth.of(cfg.data)``, or a data root: its JSON).
    """
    grid = tuple(float(w) for w in grid)
    if 0.0 not in grid:
        raise ValueError("the weight grid must contain 0 (without the crop stage)")
    crops = _crop_oof_rows(crop)
    weight = experiment_weights(first, class_weights)
    total, n = np.zeros((len(CARPALS), len(grid))), 0
    for rel, maps, crops_truth, hw in oof_maps_by_image(first, truth, progress):
        if rel not in crops:
            continue
        box, rows = crops[rel]
        cmap = sum(oof.probs(r) for oof, r in rows) / len(rows)
        probs = weighted_mean(maps, weight)
        base = upsample_threshold(probs, hw, thresholds, logits=False)
        p, q = carpal_probs(probs, hw, logits=False, box=box, crop=cmap, crop_logits=False)
        truth_c = [crops_truth[c] for c in CARPALS]
        for j, w in enumerate(grid):
            masks = blend(base, p, q, box, thresholds, [w] * len(CARPALS))
            pred = [masks.masks[c] for c in CARPALS]
            total[:, j] += dice_from_counts(*overlap_counts(pred, truth_c))
        n += 1
    if n == 0:
        raise RunError(
            "no out-of-fold image is predicted by both the first stage and the crop stage"
        )
    return CropOOF(grid, total / n, n)


def _crop_oof_rows(
    members: Sequence[MemberSpec],
) -> dict[str, tuple[Box, list[tuple[RunOOF, OofRow]]]]:
    """rel -> (box, [(crop fold's OOF, row)] of the folds holding it): the maps are read
    one image at a time, as the first stage's are."""
    out: dict[str, tuple[Box, list[tuple[RunOOF, OofRow]]]] = {}
    for m in members:
        oof = open_oof(m.run, crop=True)
        for r in oof.rows:
            out.setdefault(r.rel, (r.box, []))[1].append((oof, r))  # type: ignore[arg-type]
    return out
