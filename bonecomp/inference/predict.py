"""Test images -> validated submission CSV, streamed image batch by image batch.

load (DataLoader workers) -> ensemble (TTA x sliding window x models x folds)
-> exact sparse upsample to each image's size -> per-class thresholds
-> (with ``infer.crop``) the carpal box re-predicted by a crop ensemble and pasted
-> (a ``cleanup`` table in the thresholds file) per-class clean-up in each box -> RLE
-> rows appended to a temporary CSV -> renamed into place -> validated
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bonecomp.checks import check_config
from bonecomp.config import Config
from bonecomp.data.dataset import TestImages, to_float_image
from bonecomp.data.images import checked_shapes
from bonecomp.data.layout import discover
from bonecomp.data.preprocess import Preprocess
from bonecomp.device import pick_device
from bonecomp.inference.carpal_stage import load_crop_stage
from bonecomp.inference.class_weights import resolve_class_weights
from bonecomp.inference.cleanup import resolve_cleanup
from bonecomp.inference.ensemble import Ensemble, infer_ensemble, load_member
from bonecomp.inference.postprocess import upsample_threshold
from bonecomp.inference.thresholds import resolve_thresholds
from bonecomp.memory import run_chunked
from bonecomp.runs import MemberSpec
from bonecomp.submission import CheckReport, SubmissionWriter, validate_submission
from bonecomp.workers import loader_worker_init

OOM_HINT = "lower infer.tile with infer.sliding_window=true, or use fewer infer.scales"


@dataclass
class InferResult:
    path: Path
    rows: int
    images: int
    seconds_per_image: float
    report: CheckReport
    thresholds_from: str
    thresholds: list[float]  # the per-class thresholds applied
    weights_from: str = ""
    class_weights: dict[str, list[float]] | None = None  # {experiment: per-class} when used
    crop_boxes: dict[str, tuple[int, int, int, int] | None] | None = None  # infer.crop: per image
    views: list[str] = field(default_factory=list)  # the TTA views run (View.label)
    cleanup_from: str = "none"  # the clean-up applied per class, and from which file


def build_ensemble(
    cfg: Config, members: Sequence[MemberSpec], device: torch.device
) -> tuple[Ensemble, dict[str, list[float]] | None, str]:
    """The ``infer`` section's ensemble of ``members`` on ``device`` (TTA views, sliding
    window, compile, class weights of the thresholds file in use); also the class-weight
    table applied (None: the scalar weights) and where the weights came from."""
    weights, table, weights_from = resolve_class_weights(cfg, members)
    models = [load_member(m.checkpoint, w, device) for m, w in zip(members, weights, strict=True)]
    return infer_ensemble(models, cfg.infer), table, weights_from


def predicted_batches(
    ens: Ensemble,
    test: pd.DataFrame,
    inputs: Sequence[int | tuple[int, Preprocess]],
    cfg: Config,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> Iterator[tuple[dict, torch.Tensor]]:
    """The test images in the table's order, batch by batch (``infer.batch_size``, images
    at each of ``inputs``, see ``TestImages``), with the ensemble's maps of each batch. Out
    of memory, the images per forward halve for good and the batch is redone (same maps)."""
    inf = cfg.infer
    loader = DataLoader(
        TestImages(test, inputs),
        batch_size=inf.batch_size,
        num_workers=inf.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=partial(loader_worker_init, parent=os.getpid()),  # end with us
    )
    micro = None  # images per forward: the batch, halved for good on out of memory
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        keys = {m.input_key for m in ens.members}
        images = {k: to_float_image(batch[f"image{k}"].to(device)) for k in keys}
        pred, micro = run_chunked(
            lambda part, images=images: ens({s: x[part] for s, x in images.items()}),
            len(batch["name"]), micro, device, "infer.batch_size", OOM_HINT, tqdm.write,
        )  # fmt: skip
        yield batch, pred


def predict_submission(
    cfg: Config,
    members: Sequence[MemberSpec],
    out: Path | str | None = None,
    data_root: Path | str | None = None,
    progress: bool = True,
) -> InferResult:
    """Write the submission CSV for the test set and validate it.

    ``members`` come from ``runs.ensemble_members`` (the same resolution threshold tuning
    uses).
    """
    check_config(cfg)
    device = pick_device(cfg.infer.device, "infer.device")
    test = discover(data_root or cfg.data.root, "test")
    shapes = list(checked_shapes(test).values())  # a size verify_data rejects: refused now
    clean, cleanup_from = resolve_cleanup(cfg)  # a bad table: refused before loading models
    ens, table, weights_from = build_ensemble(cfg, members, device)
    inf = cfg.infer
    thresholds, source = resolve_thresholds(cfg, members)
    crop = load_crop_stage(cfg, device)
    boxes: dict[str, tuple[int, int, int, int] | None] = {}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) if out else Path(inf.out_dir) / f"{inf.name}_{stamp}.csv"
    names = test["name"].tolist()
    paths = test["image_path"].tolist()  # the loader keeps this order (no shuffling)
    t0 = time.monotonic()
    writer = SubmissionWriter(path)
    done = 0  # images written so far (the loader keeps the table's order)
    try:
        for batch, pred in predicted_batches(ens, test, ens.inputs, cfg, device, "infer", progress):
            for i, name in enumerate(batch["name"]):
                hw = tuple(int(v) for v in batch["hw"][i])
                if crop is None:
                    masks = upsample_threshold(pred[i], hw, thresholds, logits=ens.single_view)
                else:
                    src = paths[done]  # the source PNG: the crop is cut at full resolution
                    masks, boxes[name] = crop.masks(pred[i], ens.single_view, src, hw, thresholds)
                done += 1
                writer.add(name, (clean(masks) if clean else masks).rle())
    except BaseException:
        writer.abort()  # nothing half-written under any name
        raise
    elapsed = time.monotonic() - t0
    # Validated before it takes its final name; an invalid file becomes *.invalid.csv.
    path = writer.close(check=lambda tmp: validate_submission(tmp, names, shapes))
    return InferResult(
        path,
        writer.report.rows,
        len(test),
        elapsed / max(len(test), 1),
        writer.report,
        source,
        thresholds,
        weights_from,
        table,
        boxes if crop is not None else None,
        [v.label for v in ens.tta],
        cleanup_from,
    )
