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
(``data.crop.grid_box``), the same rule the crop model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml

from bonecomp.classes import CARPALS
from bonecomp.config import Config
from bonecomp.data.crop import Box, crop_image, grid_box
from bonecomp.data.dataset import to_float_image
from bonecomp.data.images import read_image
from bonecomp.inference.ensemble import Ensemble, load_member
from bonecomp.inference.postprocess import (
    SparseMask,
    SparseMasks,
    _trim,
    as_thresholds,
    upsample_threshold,
    upsampled_rows,
)
from bonecomp.inference.tta import views
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
    y0, y1, x0, x1 = box
    ts = as_thresholds(thresholds, full.shape[0])
    q = F.interpolate(
        crop[None, list(CARPALS)].float().to(full.device),
        size=(y1 - y0, x1 - x0),
        mode="bilinear",
        align_corners=False,
    )[0]
    if crop_logits:
        q = torch.sigmoid(q)
    for k, c in enumerate(CARPALS):
        if weights[k] == 0:
            continue  # exactly the first stage's mask
        rows = upsampled_rows(full[c], y0, y1, hw)
        p = (torch.sigmoid(rows) if logits else rows)[:, x0:x1].contiguous()
        inside = torch.lerp(p, q[k].contiguous(), float(weights[k])) > ts[c]
        masks.masks[c] = replace_box(masks.masks[c], box, inside)
    return masks


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
    return _trim(canvas if canvas.is_cuda else canvas.numpy(), uy0, ux0)


@dataclass
class CropStage:
    """The loaded crop ensemble and how its output is pasted (``infer.crop``)."""

    ensemble: Ensemble
    margin: float
    threshold: float
    weights: list[float]  # one per carpal
    members: list[MemberSpec]

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
        inputs = {
            s: to_float_image(torch.from_numpy(crop_image(image, box, s))[None].to(dev))
            for s in self.ensemble.sizes
        }
        crop = self.ensemble(inputs)[0]
        single = self.ensemble.single_view
        return paste_crop(pred, hw, thresholds, logits, box, crop, single, self.weights), box


def load_crop_stage(cfg: Config, device: torch.device) -> CropStage | None:
    """The crop stage of ``infer.crop`` (None when ``infer.crop.experiment`` is null).

    The experiment must have been trained on crops (``data.crop``); its margin is its
    ``data.crop_margin`` unless ``infer.crop.margin`` says otherwise.
    """
    spec = cfg.infer.crop
    members = crop_members(cfg)
    if not members:
        return None
    path = members[0].run.config
    saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    data = (saved or {}).get("data") or {}
    if data.get("crop") is None:
        raise RunError(
            f"infer.crop.experiment {spec.experiment!r} was not trained on crops "
            f"({path} has data.crop: null); train one with data.crop=carpal "
            "(configs/carpal_crop_1024.yaml)"
        )
    margin = spec.margin if spec.margin is not None else float(data.get("crop_margin", 0.25))
    weights = [spec.weight] * len(CARPALS) if isinstance(spec.weight, float) else list(spec.weight)
    models = [load_member(m.checkpoint, 1.0, device) for m in members]
    inf = cfg.infer
    tile = inf.tile if inf.sliding_window else None
    ens = Ensemble(models, views(inf.tta, inf.scales), tile, inf.overlap, inf.amp)
    return CropStage(ens, margin, spec.threshold, weights, members)
