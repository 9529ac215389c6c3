"""The computed GPU plan of every recipe, against what this machine can measure.

    .venv/bin/python benchmarks/bench_plan.py [--recipes demo ...] [--gpu-memory 24]
                                              [--steps 10] [--json plan.json] [--quick]

Per recipe (configs/*.yaml): the plan (``bonecomp.plan``, fake tensors: step peak at the
recipe's micro-batch, total with the framework allowance, the largest micro-batch in
--gpu-memory, inference peak, FLOPs per training and test image, the time floor of an
epoch of 800 images on a V100 and an H100) and how long it took to compute.

- On a GPU (``benchmarks/gpu_session.sh``): one real training step of the recipe at its
  micro-batch (``engine.train_step``, AMP and channels_last as training uses them, random
  uint8 batches; the optimiser's state made by a first step): the peak of
  ``torch.cuda.max_memory_allocated`` against the plan's step peak, the median step
  time of --steps against the plan's time floor on this card (the ratio is the tensor-core
  utilisation reached), and the CUDA context (used minus reserved memory) against the
  allowance. Then one batch of inference through the ensemble's own code with the
  recipe's members (copies of the model): its peak against the plan's.
- On the CPU: the plan, and the CPU check of one small recipe: the same step measured
  by torch's profiler (``bonecomp.testing.measured_cpu_step``) against the plan of the
  CPU's own step (float32, no rounding, the CPU's optimiser): "computed, not measured on
  a GPU" for every other figure.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from _common import print_machine

from bonecomp.config import load_config
from bonecomp.plan import FRAMEWORK, GiB, RecipePlan, epoch_seconds, plan_recipe
from bonecomp.plan.cards import card, card_for
from bonecomp.plan.training import StepTracer
from bonecomp.testing import measured_cpu_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "base")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=CONFIGS.parent, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plan_row(name: str, p: RecipePlan) -> str:
    tr, inf = p.training, p.inference
    f = tr.at_recipe
    v100, h100 = card("V100").tflops, card("H100").tflops
    ck = ", ckpt" if tr.checkpointing else ""
    largest = str(tr.largest_plain) + (
        f" ({tr.largest_checkpointed} ckpt)" if tr.largest_checkpointed is not None else ""
    )
    return (
        f"| `{name}` | {tr.micro_batch}{ck} | {f.peak / GiB:.2f} | {tr.total(f) / GiB:.1f} | "
        f"{tr.checkpointed.peak / GiB:.2f} | {largest} | {inf.peak / GiB:.2f} | "
        f"{tr.flops_plain / 1e12:.3g} | {inf.flops_per_image / 1e12:.3g} | "
        f"{_t(epoch_seconds(p, v100))} | {_t(epoch_seconds(p, h100))} | "
        f"{p.cpu_seconds:.0f} s ({p.seconds:.0f} s) |"
    )


HEADER = (
    "| recipe | micro-batch | step peak GiB | total GiB (+ allowance) | with checkpointing "
    "GiB | largest micro-batch | inference peak GiB | train TFLOP/img | test TFLOP/img | "
    "epoch floor V100 | epoch floor H100 | computed in: CPU (wall) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _t(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min"


# ------------------------------------------------------------------------ on a GPU
def measure_gpu(cfg, p: RecipePlan, steps: int) -> dict:
    """max_memory_allocated and step time of the recipe's real step, and one inference
    batch's peak (see the module)."""
    from bonecomp.device import amp_dtype
    from bonecomp.engine import StepContext, train_step
    from bonecomp.inference.ensemble import Ensemble, Member
    from bonecomp.inference.tta import views
    from bonecomp.losses import build_loss
    from bonecomp.models.checkpointing import set_grad_checkpointing
    from bonecomp.optim import build_optimizer
    from bonecomp.plan.inference import member_count
    from bonecomp.plan.training import build_model, compact_batch

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    model = build_model(cfg).to(dev).to(memory_format=torch.channels_last)
    set_grad_checkpointing(model, cfg.train.grad_checkpointing)
    opt = build_optimizer(model, cfg.train)
    dtype = amp_dtype(dev, cfg.train.amp)
    ctx = StepContext(dev, amp_dtype=dtype, grad_clip=cfg.train.grad_clip, channels_last=True,
                      progress=False, soft_targets=cfg.data.soft_targets, oom_retry=False,
                      check_finite=False)  # fmt: skip
    loss_fn = build_loss(cfg.loss)
    m = p.training.micro_batch
    side = cfg.data.patch_size or cfg.data.image_size
    batch = {k: v.to(dev) for k, v in compact_batch(m, side, cfg.data.soft_targets).items()}
    out: dict = {"device": torch.cuda.get_device_name(dev), "amp": str(dtype)}
    try:
        train_step(model, [batch], opt, loss_fn, ctx)  # the optimiser's state
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        train_step(model, [batch], opt, loss_fn, ctx)
        torch.cuda.synchronize(dev)
        out["train_peak"] = torch.cuda.max_memory_allocated(dev) - base
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, [batch], opt, loss_fn, ctx)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        out["step_s"] = statistics.median(times)
        free, total = torch.cuda.mem_get_info(dev)
        out["context"] = total - free - torch.cuda.memory_reserved(dev)
    except torch.OutOfMemoryError:
        out["train_peak"] = None
    del opt, batch
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    model.eval()
    n, _ = member_count(cfg)
    members = [Member(f"m{i}", model if i == 0 else _copy(model), cfg.data.image_size,
                      1.0, patch_size=cfg.data.patch_size) for i in range(n)]  # fmt: skip
    inf = cfg.infer
    ens = Ensemble(members, views(inf.tta, inf.scales),
                   inf.tile if inf.sliding_window else None, inf.overlap, inf.amp)  # fmt: skip
    x = torch.rand(inf.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=dev)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        ens({members[0].input_key: x})
        torch.cuda.synchronize(dev)
        out["infer_peak"] = torch.cuda.max_memory_allocated(dev) - base
    except torch.OutOfMemoryError:
        out["infer_peak"] = None
    return out


def _copy(model):
    import copy

    return copy.deepcopy(model)


def gpu_lines(name: str, p: RecipePlan, got: dict) -> list[str]:
    f = p.training.at_recipe
    c = card_for(got["device"])
    lines = [f"{name} on {got['device']} ({got['amp']}):"]
    if got.get("train_peak") is None:
        lines.append(f"  training step: out of memory (plan: {f.peak / GiB:.2f} GiB)")
    else:
        ratio = got["train_peak"] / f.peak
        lines.append(
            f"  training step peak: measured {got['train_peak'] / GiB:.2f} GiB, computed "
            f"{f.peak / GiB:.2f} GiB (measured / computed {ratio:.3f}; the difference is "
            "cuDNN/cuBLAS workspace and what the plan does not see)"
        )
        floor = f.flops / (c.tflops * 1e12) if c else None
        util = f" = {floor / got['step_s']:.0%} of {c.name}'s peak" if c else ""
        lines.append(
            f"  step time: measured {got['step_s'] * 1e3:.1f} ms at micro-batch "
            f"{f.micro_batch}; floor {floor * 1e3:.1f} ms{util}"
            if floor
            else f"  step time: measured {got['step_s'] * 1e3:.1f} ms (card not in the table)"
        )
        lines.append(
            f"  CUDA context: {got['context'] / GiB:.2f} GiB (allowance "
            f"{FRAMEWORK.context / GiB:.2f} GiB)"
        )
    if got.get("infer_peak") is None:
        lines.append(f"  inference: out of memory (plan {p.inference.peak / GiB:.2f} GiB)")
    else:
        lines.append(
            f"  inference batch peak: measured {got['infer_peak'] / GiB:.2f} GiB, computed "
            f"{p.inference.peak / GiB:.2f} GiB"
        )
    return lines


# ---------------------------------------------------------------------- on the CPU
def cpu_check(name: str, side: int) -> str:
    """The CPU's own step of ``name`` at ``side`` px, batch 2, float32: measured by the
    profiler against the plan of that step."""
    cfg = load_config(CONFIGS / f"{name}.yaml", [
        "model.encoder_weights=null", f"data.image_size={side}", "data.patch_size=null",
        "train.batch_size=2", "train.amp=false", "train.ema=null",
    ])  # fmt: skip
    t0 = time.perf_counter()
    measured, at_peak = measured_cpu_step(cfg, 2)
    t1 = time.perf_counter()
    tracer = StepTracer(cfg, dtype=None, round_to=1, foreach=None)
    f = tracer.figures(2)
    t2 = time.perf_counter()
    return (
        f"CPU check, {name} at {side} px, batch 2, float32: measured peak "
        f"{measured / 2**20:.1f} MiB (torch profiler, {t1 - t0:.0f} s), computed "
        f"{f.peak / 2**20:.1f} MiB ({t2 - t1:.0f} s): {f.peak / measured - 1:+.2%}; parameters "
        f"{at_peak.get('PARAMETER', 0) / 2**20:.2f} vs {tracer.weight_bytes / 2**20:.2f} MiB, "
        f"activations computed {f.activations / 2**20:.1f} MiB"
    )


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="configs/<name>.yaml")
    ap.add_argument("--gpu-memory", type=float, default=24.0, help="GiB target of the plan")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps on a GPU")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--quick", action="store_true", help="the demo recipe only")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print_machine(f", torch {torch.__version__}, commit {commit()}, "
                  f"{'GPU ' + torch.cuda.get_device_name(0) if cuda else 'no GPU'}")  # fmt: skip
    recipes = ["demo"] if args.quick else args.recipes
    rows, notes, dump = [], [], {}
    for name in recipes:
        cfg = load_config(CONFIGS / f"{name}.yaml", ["model.encoder_weights=null"])
        p = plan_recipe(cfg, int(args.gpu_memory * GiB), config=f"configs/{name}.yaml")
        rows.append(plan_row(name, p))
        dump[name] = {"plan": asdict(p)}
        print(rows[-1], flush=True)
        if cuda:
            got = measure_gpu(cfg, p, args.steps)
            dump[name]["measured"] = got
            notes += gpu_lines(name, p, got)
    print(f"\nplans for a {args.gpu_memory:g} GiB target (computed, not measured on a GPU):")
    print(HEADER)
    print("\n".join(rows))
    if cuda:
        print("\n" + "\n".join(notes))
    else:
        print("\n" + cpu_check("demo", 128 if args.quick else 192))
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
