"""Pseudo-labels: an ensemble's probabilities on the test images, saved for training.

load (DataLoader workers) -> ensemble (the same members, TTA, class weights as
``predict_submission``) -> probabilities at ``data.image_size`` -> pseudo-label folder
(``bonecomp.data.pseudo_dir``: images preprocessed and resized as the training cache of
``cfg.data`` does, so a run with that ``data.preprocess`` trains on them as on its cache;
probabilities as uint8), written under a temporary name and renamed into place whole.

The folder keeps raw probabilities; the confidence rule is the training's choice
(``train.pseudo_rule``), and the per-class thresholds of the ensemble are stored with
them (binary-target training uses them to make masks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from bonecomp.checks import check_config
from bonecomp.config import Config
from bonecomp.data.images import checked_shapes
from bonecomp.data.layout import discover
from bonecomp.data.preprocess import Preprocess
from bonecomp.data.pseudo_dir import PseudoWriter
from bonecomp.device import pick_device
from bonecomp.inference.predict import build_ensemble, predicted_batches
from bonecomp.inference.thresholds import resolve_thresholds
from bonecomp.runs import MemberSpec, pseudo_path


@dataclass
class PseudoResult:
    path: Path
    images: int
    size: int
    seconds_per_image: float
    thresholds_from: str
    weights_from: str


def write_pseudo_labels(
    cfg: Config,
    members: Sequence[MemberSpec],
    out: Path | str | None = None,
    data_root: Path | str | None = None,
    progress: bool = True,
) -> PseudoResult:
    """Write the pseudo-label folder of the test images (default ``runs.pseudo_path``) at
    ``data.image_size``; ``members`` come from ``runs.ensemble_members``."""
    check_config(cfg)
    device = pick_device(cfg.infer.device, "infer.device")
    root = Path(data_root or cfg.data.root)
    test = discover(root, "test")
    shapes = checked_shapes(test)  # a size verify_data rejects: refused before any model
    ens, table, weights_from = build_ensemble(cfg, members, device)
    thresholds, thresholds_from = resolve_thresholds(cfg, members)
    size, inf = cfg.data.image_size, cfg.infer
    prep = Preprocess.of(cfg.data)  # the images are for a run with this data section
    index = test[["rel", "patient", "name"]].copy()
    index["src_h"], index["src_w"] = zip(*shapes.values(), strict=True)
    writer = PseudoWriter(Path(out) if out else pseudo_path(cfg), index, size)
    batches = predicted_batches(
        ens, test, [*ens.inputs, (size, prep)], cfg, device, "pseudo-labels", progress
    )
    t0, row = time.monotonic(), 0
    try:
        for batch, pred in batches:
            if pred.shape[-1] != size:  # logits or probabilities: both interpolate linearly
                pred = F.interpolate(pred, (size, size), mode="bilinear", align_corners=False)
            probs = (torch.sigmoid(pred) if ens.single_view else pred).float().cpu().numpy()
            for i in range(len(probs)):
                writer.add(row, batch[f"image{prep.key(size)}"][i].numpy(), probs[i])
                row += 1
        meta = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data_root": str(root.resolve()),
            "members": [{"checkpoint": str(m.checkpoint), "weight": m.weight} for m in members],
            "class_weights": table,
            "weights_from": weights_from,
            "thresholds": thresholds,
            "thresholds_from": thresholds_from,
            "tta": list(inf.tta),
            "scales": list(inf.scales),
            "sliding_window": inf.sliding_window,
            "preprocess": prep.label,
        }
        path = writer.close(meta).path
    except BaseException:
        writer.abort()  # no half-written folder under any name
        raise
    elapsed = time.monotonic() - t0
    return PseudoResult(
        path, len(test), size, elapsed / max(len(test), 1), thresholds_from, weights_from
    )
