"""Training throughput of the shipped recipes, and whether the data pipeline keeps up.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--cpu-size 256] [--steps 3]

Per recipe (configs/*.yaml):
- model: forward + backward + AdamW step, images/s. On a GPU at the recipe's input size
  with our settings (AMP + channels_last) against the plain reference (float32, NCHW) in
  the same run; without one, on CPU at --cpu-size (channels_last vs NCHW, float32).
- library step: the library's own step (``engine.train_step`` via ``train_one_epoch``:
  the recipe's loss, uint8 batches as the loader yields them, converted on the device,
  grad clipping, the non-finite check) against the hand-written loop above with the same
  settings, in the same run: what the step's bookkeeping costs.
- GPU memory for the recipe's batch, estimated: activations from forward hooks (halved
  for AMP) plus weights, gradients and AdamW moments in float32. On a GPU the measured
  peak (torch.cuda.max_memory_allocated) is printed beside it.
- loader: samples/s the recipe's DataLoader (its workers, capped at the CPU count; its
  augmentation and targets) delivers from a cache at the recipe's input size, against
  the model's images/s: a ratio >= 1 means the loader keeps up.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _common import Row, base_parser, phantom_root, print_machine, print_table

from bonecomp.config import load_config
from bonecomp.data.cache import CacheSpec, open_cache
from bonecomp.data.layout import discover
from bonecomp.device import amp_dtype
from bonecomp.engine import Epoch, StepContext, train_one_epoch
from bonecomp.losses import build_loss
from bonecomp.models import create_model
from bonecomp.training.data import build_loaders

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ["demo", "fcn8s_r50_512", "unetpp_effb4_1024", "deeplabv3p_r101_1024", "unet_effb0_2048"]


def model_rate(
    cfg, size: int, batch: int, steps: int, device: torch.device, ours: bool
) -> tuple[float, float]:
    """(images/s, peak GPU GiB or nan) of training steps; ``ours``: AMP + channels_last."""
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device)
    fmt = torch.channels_last if ours else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 29, size, size, device=device) > 0.95).float()
    dtype = amp_dtype(device, ours)
    amp = dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = float("nan")
    return batch * steps / (time.perf_counter() - t0), peak


def library_rate(cfg, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of the library's training step (``train_one_epoch`` -> ``train_step``) with
    our settings (AMP on GPU, channels_last), the recipe's loss and grad clipping, on
    compact uint8 batches as the training loader yields them."""
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    dtype = amp_dtype(device, enabled=True)
    ctx = StepContext(
        device,
        dtype,
        torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
        grad_clip=cfg.train.grad_clip,
        channels_last=True,
        progress=False,
        soft_targets=cfg.data.soft_targets,
    )
    g = torch.Generator().manual_seed(0)
    on = 255 if cfg.data.soft_targets else 1
    batches = [
        {
            "image": torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, generator=g),
            "mask": ((torch.rand(batch, 29, size, size, generator=g) > 0.95) * on).to(torch.uint8),
            "index": torch.arange(batch),
        }
        for _ in range(steps)
    ]
    loss_fn, sched = build_loss(cfg.loss).to(device), SimpleNamespace(step_update=lambda n: None)
    train_one_epoch(model, batches[:1], opt, sched, loss_fn, ctx, Epoch(index=0))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    train_one_epoch(model, batches, opt, sched, loss_fn, ctx, Epoch(index=0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def estimated_gib(cfg, batch: int) -> float:
    """Activations (forward hooks at 64 px, scaled by pixels, 2 bytes under AMP) per image
    times the batch, plus weights + grads + 2 AdamW moments in float32."""
    model = create_model(cfg.model).eval()
    total = [0]
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: total.__setitem__(0, total[0] + o.numel()))
        for m in model.modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    activations = total[0] * (cfg.data.image_size / 64) ** 2 * 2
    params = sum(p.numel() for p in model.parameters()) * 4 * 4
    return (activations * batch + params) / 2**30


def loader_rate(cfg, root: Path, cache_dir: Path, batches: int) -> float:
    """Samples/s of the training loader the trainer builds (``build_loaders``), over
    as many epochs of the phantom as ``batches`` needs."""
    cfg.data.num_workers = min(cfg.data.num_workers, os.cpu_count() or 1)
    cache = open_cache(
        discover(root, "train"), cache_dir, CacheSpec(cfg.data.image_size), progress=False
    )
    rows = np.arange(len(cache))
    loader = build_loaders(cfg, cache, rows, rows[:1]).train_loader
    seen, t0 = 0, None
    while True:
        for batch in loader:
            if t0 is None:  # workers started, first batch ready
                t0 = time.perf_counter()
                continue
            seen += len(batch["image"])
            if seen >= batches * cfg.train.batch_size:
                return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = base_parser(__doc__, repeats=1, patients=4)
    ap.add_argument("--cpu-size", type=int, default=256, help="input size for CPU timing")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="configs/<name>.yaml")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print_machine(f", torch threads {torch.get_num_threads()}, device {device}")
    recipes = args.recipes[:2] if args.quick else args.recipes
    steps = 1 if args.quick else args.steps
    rows: list[Row] = []
    notes = []
    with phantom_root(args.data, args.patients, args.seed) as root:
        for name in recipes:
            cfg = load_config(CONFIGS / f"{name}.yaml", ["model.encoder_weights=null"])
            size = cfg.data.image_size if cuda else min(args.cpu_size, cfg.data.image_size)
            batch = cfg.train.batch_size if cuda else 2
            ours, peak = model_rate(cfg, size, batch, steps, device, ours=True)
            ref, _ = model_rate(cfg, size, batch, steps, device, ours=False)
            where = f"{size} px, batch {batch}"
            rows.append(
                Row(f"{name}: model img/s ({where})", ours, ref, "/s", higher_is_better=True)
            )
            lib = library_rate(cfg, size, batch, steps, device)
            rows.append(
                Row(
                    f"{name}: library step vs hand loop img/s",
                    lib,
                    ours,
                    "/s",
                    higher_is_better=True,
                    target=0.9,
                )
            )
            feed = loader_rate(cfg, root, root / "cache", 3 if args.quick else 8)
            rows.append(
                Row(
                    f"{name}: loader vs model img/s",
                    feed,
                    ours,
                    "/s",
                    higher_is_better=True,
                    target=1.0,
                )
            )
            est = estimated_gib(cfg, cfg.train.batch_size)
            notes.append(
                f"{name}: {cfg.data.image_size} px, batch {cfg.train.batch_size}: "
                f"GPU memory estimate {est:.1f} GiB"
                + (f", measured peak {peak:.1f} GiB" if cuda else "")
            )
    print_table(
        "Training throughput: ours (AMP on GPU, channels_last) vs plain fp32 NCHW; the "
        "library's step vs the same hand-written loop; loader vs model",
        rows,
    )
    for n in notes:
        print(n)
    if not cuda:
        print(
            "no GPU: model rates are CPU figures at a small size; the loader rate is what "
            "this machine's cores deliver"
        )


if __name__ == "__main__":
    sys.exit(main())
