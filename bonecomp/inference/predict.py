"""Test images -> validated submission CSV, streamed image batch by image batch.

load (DataLoader workers) -> ensemble (TTA x sliding window x models x folds)
-> exact sparse upsample to each image's size -> per-class thresholds -> RLE
-> rows appended to a temporary CSV -> renamed into place -> validated
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bonecomp.classes import CLASSES, NUM_CLASSES
from bonecomp.config import Config
from bonecomp.data.dataset import TestImages
from bonecomp.data.layout import discover
from bonecomp.inference.ensemble import Ensemble, load_member
from bonecomp.inference.postprocess import as_thresholds, upsample_threshold
from bonecomp.inference.tta import views
from bonecomp.submission import CheckReport, SubmissionWriter, validate_submission


@dataclass
class InferResult:
    path: Path
    rows: int
    images: int
    seconds_per_image: float
    report: CheckReport
    thresholds_from: str


def find_checkpoints(
    cfg: Config, ensemble: bool, explicit: Sequence[str] = ()
) -> list[tuple[Path, float]]:
    """(checkpoint, weight) pairs: explicit paths, the config's ensemble section, or every
    ``best.pt`` under the runs folder; without ``ensemble``, just one checkpoint."""
    runs = Path(cfg.train.output_dir)
    if explicit:
        found = [(Path(p), 1.0) for p in explicit]
    elif cfg.infer.ensemble:
        found = [
            (runs / m.experiment / f"fold{k}" / m.checkpoint, m.weight)
            for m in cfg.infer.ensemble
            for k in m.folds
        ]
    else:
        found = [(p, 1.0) for p in sorted(runs.glob("*/fold*/best.pt"))]
    if not ensemble and not explicit:
        found = found[:1]
    missing = [str(p) for p, _ in found if not p.is_file()]
    if missing or not found:
        have = sorted(str(p) for p in runs.glob("*/fold*/*.pt"))
        raise FileNotFoundError(
            f"checkpoints not found: {missing or 'none configured'}; available under {runs}: "
            f"{have or 'none (train first: python scripts/train.py --fold 0)'}"
        )
    return found


def resolve_thresholds(cfg: Config) -> tuple[list[float], str]:
    """Per-class thresholds: infer.thresholds, else the tuned file for infer.name, else
    infer.threshold for every class. Returns them and where they came from."""
    path = Path(cfg.infer.thresholds) if cfg.infer.thresholds else default_thresholds_path(cfg)
    if cfg.infer.thresholds or path.is_file():
        return read_thresholds(path), str(path)
    return as_thresholds(cfg.infer.threshold, NUM_CLASSES), f"{cfg.infer.threshold} for all classes"


def default_thresholds_path(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / f"thresholds_{cfg.infer.name}.json"


def read_thresholds(path: Path) -> list[float]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"thresholds file {path}: cannot read ({e})") from e
    if doc.get("classes") != list(CLASSES):
        raise ValueError(f"thresholds file {path}: classes differ from the competition's 29")
    return as_thresholds(doc["thresholds"], NUM_CLASSES)


def predict_submission(
    cfg: Config,
    checkpoints: Sequence[tuple[Path, float]],
    out: Path | str | None = None,
    data_root: Path | str | None = None,
    progress: bool = True,
) -> InferResult:
    """Write the submission CSV for the test set and validate it."""
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    )
    test = discover(data_root or cfg.data.root, "test")
    members = [load_member(p, w, device) for p, w in checkpoints]
    inf = cfg.infer
    tile = inf.tile if inf.sliding_window else None
    ens = Ensemble(members, views(inf.tta, inf.scales), tile, inf.overlap, cfg.train.amp)
    thresholds, source = resolve_thresholds(cfg)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) if out else Path(inf.out_dir) / f"{inf.name}_{stamp}.csv"
    loader = DataLoader(
        TestImages(test, ens.sizes),
        batch_size=inf.batch_size,
        num_workers=inf.num_workers,
        pin_memory=device.type == "cuda",
    )
    t0 = time.monotonic()
    with SubmissionWriter(path) as writer:
        for batch in tqdm(loader, desc="infer", unit="batch", disable=not progress):
            images = {s: _to_float(batch[f"image{s}"], device) for s in ens.sizes}
            pred = ens(images)
            for i, name in enumerate(batch["name"]):
                hw = tuple(int(v) for v in batch["hw"][i])
                masks = upsample_threshold(pred[i], hw, thresholds, logits=ens.single_view)
                writer.add(name, masks.rle())
    elapsed = time.monotonic() - t0
    shapes = [tuple(int(v) for v in s) for s in _shapes(test)]
    report = validate_submission(path, test["name"].tolist(), shapes)
    return InferResult(path, report.rows, len(test), elapsed / max(len(test), 1), report, source)


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255)
    return x[:, None].expand(-1, 3, -1, -1)


def _shapes(test) -> list[tuple[int, int]]:
    from bonecomp.data.images import png_shape

    return [png_shape(p) for p in test["image_path"]]


def write_thresholds(path: Path, thresholds: Sequence[float], **info) -> Path:
    doc = {"classes": list(CLASSES), "thresholds": [float(t) for t in thresholds], **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=lambda v: np.asarray(v).tolist()))
    tmp.replace(path)
    return path
