"""Reference implementations and small fixtures shared by ``tests/`` and ``benchmarks/``.

Like ``numpy.testing``: a library module so both the test suite and the benchmark scripts
import one copy of each reference, never their own. The references are deliberately the
slow, obvious definitions (the competition baseline's RLE, Dice on full-size masks,
``cv2.fillPoly`` ground truth), written without the library's fast paths, so comparing
the two can fail. Nothing in the library imports this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from bonecomp.config import Config, load_config
from bonecomp.data.annotations import Polygons
from bonecomp.data.phantom import make_phantom
from bonecomp.inference.postprocess import as_thresholds

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# The tests' phantom: 5 training patients (10 images), 2 test patients (4 images), 128 px.
TINY = {"train_patients": 5, "test_patients": 2, "size": 128, "seed": 3}


# ------------------------------------------------------------------------------ RLE
def classic_encode(mask: np.ndarray) -> str:
    """The competition baseline's ``rle_encode``: flatten, pad, compare neighbours, join.

    The reference ``bonecomp.rle.encode`` must match byte for byte (binary masks).
    """
    pixels = mask.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def classic_decode(rle_str: str, height: int, width: int) -> np.ndarray:
    """The competition baseline's ``decode_rle_to_mask``: (height, width) uint8 in {0, 1}."""
    s = rle_str.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(height * width, dtype=np.uint8)
    for lo, hi in zip(starts, ends, strict=True):
        img[lo:hi] = 1
    return img.reshape(height, width)


# ------------------------------------------------------------------------------ Dice
def dense_truth(polygons: Polygons, hw: tuple[int, int]) -> np.ndarray:
    """Ground truth (C, H, W) uint8: each class's polygon ``cv2.fillPoly``-ed at full size."""
    out = np.zeros((len(polygons), *hw), np.uint8)
    for c in range(len(polygons)):
        cv2.fillPoly(out[c], [np.asarray(polygons[c], np.int32).reshape(-1, 2)], 1)
    return out


def dense_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Competition Dice (2|A∩B| + 1e-4) / (|A| + |B| + 1e-4) over the last two axes of
    full-size masks (nonzero is foreground), float64 of the leading shape."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    inter = (p & t).sum(axis=(-2, -1), dtype=np.float64)
    return (2 * inter + 1e-4) / (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + 1e-4)


def reference_masks(
    x: torch.Tensor,
    out_hw: tuple[int, int],
    thresholds: float | Sequence[float] = 0.5,
    logits: bool = True,
) -> torch.Tensor:
    """The dense definition of ``inference.postprocess.upsample_threshold`` (full float
    maps): each class of ``x`` (C, h, w) upsampled bilinearly to ``out_hw``, sigmoid (for
    logits), > its threshold; (C, H, W) bool.

    Each class is upsampled on its own: that result is the same at any thread count,
    while torch's CPU kernel rounds a multi-channel call in one thread differently in the
    last bit (seen with torch 2.14 on x86 AVX2), which moves pixels within an ulp of
    the threshold. It calls ``F.interpolate`` itself, not the library's ``_upsample``: a
    reference that shared the helper under test could not catch a fault in it.
    """
    ts = torch.tensor(as_thresholds(thresholds, x.shape[0]), device=x.device)
    each = [
        F.interpolate(xc[None, None], size=out_hw, mode="bilinear", align_corners=False)
        for xc in x.detach().float()
    ]
    up = torch.cat(each)[:, 0]
    p = torch.sigmoid(up) if logits else up
    return p > ts.float()[:, None, None]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, then put back: some CPU
    kernels round differently at one thread than at several."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dense_validation_dice(
    logits: torch.Tensor, polygons: Polygons, src_hw: tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
    """The baseline's validation Dice of one image, per class (C,): ``reference_masks`` of
    the logits (C, h, w) at the full size, against ``dense_truth``."""
    pred = reference_masks(logits.cpu(), tuple(src_hw), threshold).numpy()
    return dense_dice(pred, dense_truth(polygons, src_hw))


def assert_same_warp(
    got: torch.Tensor, want: torch.Tensor, share: float, max_step: int | None = 1
) -> None:
    """``got`` equals ``want`` up to rounding: fewer than ``share`` of the values differ,
    each by at most ``max_step`` (None: any step). OpenCV's fixed-point warp may move a
    pixel by one grey level; albumentations moves keypoints in float32 where we use
    float64, which may move a sub-sample of a mask pixel on a bone's edge."""
    diff = (got.int() - want.int()).abs()
    assert max_step is None or diff.max() <= max_step, diff.max()
    assert (diff > 0).float().mean() < share, (diff > 0).sum()


# ------------------------------------------------------------------------------ data
def ensure_phantom(
    root: Path | str,
    train_patients: int,
    test_patients: int = 0,
    size: int = 2048,
    seed: int = 0,
    workers: int | None = None,
    bent_patients: int | None = None,
    appearance: str = "default",
) -> bool:
    """Write a phantom into ``root`` unless one with the splits asked for is there.

    Returns True when it wrote one. ``workers`` defaults to at most 2 processes;
    ``bent_patients`` and ``appearance`` as ``make_phantom``'s.
    """
    root = Path(root)
    have = (not train_patients or (root / "train" / "DCM").is_dir()) and (
        not test_patients or (root / "test" / "DCM").is_dir()
    )
    if have:
        return False
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    make_phantom(
        root,
        train_patients,
        test_patients,
        size,
        seed,
        workers,
        progress=False,
        bent_patients=bent_patients,
        appearance=appearance,
    )
    return True


def tiny_phantom(root: Path | str) -> Path:
    """The tests' 128 px phantom (``TINY``) written into ``root`` (one process)."""
    make_phantom(root, workers=1, progress=False, **TINY)
    return Path(root)


# ------------------------------------------------------------------------------ configs
def tiny_overrides(data_root: Path | str, work: Path | str, **extra) -> list[str]:
    """Dotted overrides for a seconds-long CPU run of ``configs/demo.yaml`` on ``data_root``:
    64 px U-Net on timm's ``test_resnet`` (2.3 M parameters, a sixth of the demo's ResNet-18:
    a third of the time per run, a sixth of the checkpoint bytes) from scratch, 2 epochs at
    lr 1e-2 (at the demo's 3e-3 this net predicts no foreground yet), everything written
    under ``work``.
    ``extra`` adds or replaces keys (``**{"train.epochs": 3}``)."""
    work = Path(work)
    values = {
        "data.root": str(data_root),
        "data.cache_dir": str(work / "cache"),
        "data.image_size": 64,
        "data.num_workers": 0,
        "model.arch": "unet",
        "model.encoder": "tu-test_resnet",
        "model.encoder_weights": None,
        "train.output_dir": str(work / "runs"),
        "train.experiment": "tiny",
        "train.epochs": 2,
        "train.lr": 1e-2,
        "train.batch_size": 4,
        "train.oof_size": 32,
        "train.val_every": 1,
        "train.device": "cpu",
        "infer.ensemble": [{"experiment": "tiny", "folds": [0]}],
        "infer.num_workers": 0,
        **extra,
    }
    return as_overrides(values)


def as_overrides(values: dict) -> list[str]:
    """``{dotted key: value}`` -> the ``key=value`` overrides the CLI takes (YAML values)."""
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]


def tiny_config(data_root: Path | str, work: Path | str, **extra) -> Config:
    """``configs/demo.yaml`` with ``tiny_overrides`` applied."""
    return load_config(DEMO_CONFIG, tiny_overrides(data_root, work, **extra))


# ------------------------------------------------------------------------- the plan
def measured_cpu_step(cfg: Config, micro_batch: int) -> tuple[int, dict[str, int]]:
    """The peak of live tensor bytes of one real training step of ``cfg`` on the CPU
    (float32, the optimiser's state already made by a first step), measured by torch's
    profiler (``profile_memory``) and its memory timeline, which sorts every allocation
    into parameters, optimizer state, gradients, activations, ... by what the tensor
    became; returns (peak, {category: bytes alive at the peak}).

    The reference the plan (``bonecomp.plan``, fake tensors) is checked against: real
    kernels and the allocator's own accounting, nothing of the plan's. It runs at two
    threads: the categories are torch's guess from the op graph, and at one thread (a test
    worker's share of 2 cores) the same peak of EfficientNet-B0 had 5.6 MB more
    "parameters" than the model has (torch 2.14).
    """
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from bonecomp.engine import StepContext, train_step
    from bonecomp.losses import build_loss
    from bonecomp.models import create_model
    from bonecomp.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(cfg.model.model_copy(update={"encoder_weights": None})).train()
    optimizer = build_optimizer(model, cfg.train)
    ctx = StepContext(
        torch.device("cpu"), grad_clip=cfg.train.grad_clip, progress=False,
        soft_targets=cfg.data.soft_targets, oom_retry=False, check_finite=False,
    )  # fmt: skip
    loss_fn = build_loss(cfg.loss)
    side = cfg.data.patch_size or cfg.data.image_size
    top = 256 if cfg.data.soft_targets else 2
    batch = {
        "image": torch.randint(0, 256, (micro_batch, side, side), dtype=torch.uint8),
        "mask": torch.randint(0, top, (micro_batch, 29, side, side), dtype=torch.uint8),
        "index": torch.arange(micro_batch),
    }
    with torch_threads(2):
        train_step(model, [batch], optimizer, loss_fn, ctx)  # the optimiser's state
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
            with_stack=True,
        ) as prof:  # fmt: skip
            train_step(model, [batch], optimizer, loss_fn, ctx)
    memory = prof._memory_profile()
    live: dict[str, int] = defaultdict(int)
    total = peak = 0
    at_peak: dict[str, int] = {}

    def category(key, version) -> str:
        c = memory._categories.get(key, version)
        return c.name if c is not None else "UNKNOWN"

    for _, action, (key, version), size in memory.timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live[category(key, version)] += size
            total += size
        elif action == Action.INCREMENT_VERSION:
            live[category(key, version - 1)] -= size
            live[category(key, version)] += size
        elif action == Action.DESTROY:
            live[category(key, version)] -= size
            total -= size
        if total > peak:
            peak, at_peak = total, dict(live)
    return peak, {k: v for k, v in at_peak.items() if v}
