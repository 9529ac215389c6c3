"""A recipe's GPU plan, computed without a GPU (``scripts/doctor.py --plan``).

The recipe's own code (model, optimiser, loss, ``engine.train_step``, the inference
ensemble) runs on fake tensors (``plan.fake``): every tensor's shape, dtype and storage,
no data. From it, exactly: the bytes of the weights, gradients and optimiser state; the
activations kept for the backward at the recipe's input size, micro-batch and CUDA
autocast dtype; the peak of live tensors over a training step (what
``torch.cuda.max_memory_allocated`` reads, the caching allocator's 512-byte rounding
included); the largest micro-batch under a memory target, with and without gradient
checkpointing; the same for one batch of inference; and the FLOPs of convolutions and
matrix products per training image and per test image. Not visible to fake tensors, and
so stated as allowances (``FRAMEWORK``): the CUDA context, cuDNN/cuBLAS workspaces and
the allocator's slack. Time floors divide the FLOPs by the cards' published tensor-core
peaks (``plan.cards``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bonecomp.config import Config
from bonecomp.plan.cards import CARDS, EPOCH_IMAGES, TEST_IMAGES, UTILISATION
from bonecomp.plan.fake import CATEGORIES
from bonecomp.plan.inference import InferenceFigures, trace_inference
from bonecomp.plan.training import StepFigures, StepTracer, recipe_micro_batch, side_of

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Framework:
    """What fake tensors cannot see, added to a computed peak as an allowance.

    ``context``: the CUDA context (driver, kernels loaded lazily: about 0.3 to 0.6 GiB on
    current cards; outside ``max_memory_allocated``). ``workspace``: cuDNN convolution and
    cuBLAS workspaces, allocated through the caching allocator (tens to hundreds of MiB
    for these convolutions at 1024 to 2048 px). ``slack``: the caching allocator's
    fragmentation, reserved minus allocated, as a share of the peak (commonly 5 to 15 %).
    """

    context: int = GiB // 2
    workspace: int = GiB // 2
    slack: float = 0.10

    def on(self, peak: int) -> int:
        """The allowance on top of ``peak``."""
        return self.context + self.workspace + round(self.slack * peak)

    def budget(self, target: int) -> int:
        """The largest computed peak that fits ``target`` with the allowance."""
        return int((target - self.context - self.workspace) / (1 + self.slack))

    def describe(self) -> str:
        return (
            f"CUDA context {self.context / GiB:.2f} GiB + cuDNN/cuBLAS workspace "
            f"{self.workspace / GiB:.2f} GiB + allocator slack {self.slack:.0%} of the peak"
        )


FRAMEWORK = Framework()


@dataclass
class TrainingPlan:
    micro_batch: int  # the recipe's
    checkpointing: bool  # the recipe's train.grad_checkpointing
    parameters: int
    weight_bytes: int
    buffer_bytes: int
    ema_bytes: int
    optimizer_bytes: int
    optimizer_kinds: list[str]
    at_recipe: StepFigures  # the recipe's micro-batch, its checkpointing setting
    plain: StepFigures  # the recipe's micro-batch without checkpointing
    checkpointed: StepFigures  # ... with it
    smallest: int  # the fewest images a training forward takes (2: BatchNorm after pooling)
    one_plain: StepFigures  # at ``smallest``
    one_checkpointed: StepFigures
    largest_plain: int  # in the target (0: not one image)
    largest_checkpointed: int | None  # None: not searched (the recipe's fits without)
    flops_plain: int  # per training image
    flops_checkpointed: int

    def total(self, f: StepFigures) -> int:
        """A step's peak plus the EMA copy (outside the traced step) and the allowance."""
        return f.peak + self.ema_bytes + FRAMEWORK.on(f.peak + self.ema_bytes)


@dataclass
class RecipePlan:
    config: str
    what: str  # architecture / encoder
    side: int
    patch: bool
    target: int
    training: TrainingPlan
    inference: InferenceFigures
    seconds: float = 0.0  # to compute it (wall clock)
    cpu_seconds: float = 0.0  # to compute it (this process's CPU time)
    notes: list[str] = field(default_factory=list)


def plan_recipe(cfg: Config, target: int = 24 * GiB, config: str = "") -> RecipePlan:
    """The plan of ``cfg`` for a GPU of ``target`` bytes (see the module)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tracer = StepTracer(cfg)
    mb = recipe_micro_batch(cfg)
    ema = (tracer.weight_bytes + tracer.buffer_bytes) if cfg.train.ema else 0
    budget = FRAMEWORK.budget(target) - ema
    plain, ckpt = tracer.figures(mb, False), tracer.figures(mb, True)
    training = TrainingPlan(
        micro_batch=mb,
        checkpointing=cfg.train.grad_checkpointing,
        parameters=tracer.parameters,
        weight_bytes=tracer.weight_bytes,
        buffer_bytes=tracer.buffer_bytes,
        ema_bytes=ema,
        optimizer_bytes=tracer.optimizer_bytes,
        optimizer_kinds=tracer.optimizer_kinds,
        at_recipe=ckpt if cfg.train.grad_checkpointing else plain,
        plain=plain,
        checkpointed=ckpt,
        smallest=tracer.smallest,
        one_plain=tracer.figures(tracer.smallest, False),
        one_checkpointed=tracer.figures(tracer.smallest, True),
        largest_plain=(largest := tracer.largest_fit(budget, False)),
        # searched only where it matters: when the recipe's micro-batch does not fit
        largest_checkpointed=tracer.largest_fit(budget, True) if largest < mb else None,
        flops_plain=tracer.flops_per_sample(False),
        flops_checkpointed=tracer.flops_per_sample(True),
    )
    inference = trace_inference(cfg)
    net = tracer.model.net
    return RecipePlan(
        config=config,
        what=f"{type(net).__name__} / {cfg.model.encoder}",
        side=side_of(cfg),
        patch=cfg.data.patch_size is not None,
        target=target,
        training=training,
        inference=inference,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - c0,
    )


def fits_at_all(p: RecipePlan) -> bool:
    """One image trains within the target, with gradient checkpointing if need be."""
    tr = p.training
    return min(tr.total(tr.one_plain), tr.total(tr.one_checkpointed)) <= p.target


def planned_micro_batch(cfg: Config, budget: int, dtype: torch.dtype | None) -> int:
    """The largest micro-batch (at most ``train.batch_size``) whose computed step peak,
    plus the EMA copy, stays within ``budget`` bytes; 0 when not even one image does
    (what ``train.micro_batch: auto`` starts its probe from)."""
    tracer = StepTracer(cfg, dtype or torch.float16)
    ema = (tracer.weight_bytes + tracer.buffer_bytes) if cfg.train.ema else 0
    fit = tracer.largest_fit(budget - ema, cfg.train.grad_checkpointing)
    return min(fit, cfg.train.batch_size)


# --------------------------------------------------------------------------- the text
def _g(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / MiB:.1f} MiB"


def _t(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fits(total: int, target: int) -> str:
    return f"fits {target / GiB:g} GiB" if total <= target else f"over {target / GiB:g} GiB"


def format_plan(p: RecipePlan) -> str:
    """The plan as the doctor prints it."""
    tr, inf, fw = p.training, p.inference, FRAMEWORK
    f = tr.at_recipe
    target = p.target
    geometry = f"{p.side} px patches" if p.patch else f"{p.side} px whole images"
    ck = "true" if tr.checkpointing else "false"
    lines = [
        f"plan: {p.config} (computed on fake tensors in {p.seconds:.0f} s, {p.cpu_seconds:.0f} s"
        " of CPU; not measured on a GPU)",
        f"model      {p.what}, {tr.parameters / 1e6:.1f} M parameters; training on {geometry};"
        " CUDA autocast float16 (bfloat16 on Ampere and newer takes the same bytes)",
        f"target     {target / GiB:g} GiB (--gpu-memory); framework allowance: {fw.describe()}",
        "",
        f"training step at micro-batch {tr.micro_batch}, train.grad_checkpointing={ck}:",
        f"  weights            {_g(tr.weight_bytes):>10}  exact: float32 parameters"
        f" (+ buffers {_g(tr.buffer_bytes)})",
    ]
    if tr.ema_bytes:
        lines.append(
            f"  EMA copy           {_g(tr.ema_bytes):>10}  exact (train.ema: a weights copy)"
        )
    kinds = ", ".join(tr.optimizer_kinds) or "none"
    lines += [
        f"  optimizer state    {_g(tr.optimizer_bytes):>10}  exact: {kinds}",
        f"  gradients          {_g(f.gradients):>10}  exact: all alive at the optimizer step",
        f"  activations        {_g(f.activations):>10}  exact: kept for the backward,"
        f" {_g(f.activations / f.micro_batch)} per image"
        f" (CUDA autocast; {_correction(f.cuda_correction)})",
        f"  step peak          {_g(f.peak):>10}  exact: most alive at once, in the "
        + ("optimizer step" if f.in_step else "forward/backward")
        + " (max_memory_allocated without workspaces)",
        "    at that moment: " + _at_peak(f.at_peak),
        f"  framework          {_g(fw.on(f.peak + tr.ema_bytes)):>10}  allowance (above)",
        f"  total              {_g(tr.total(f)):>10}  {_fits(tr.total(f), target)}",
        "",
        f"largest micro-batch in {target / GiB:g} GiB: {_largest(tr.largest_plain, tr.micro_batch)}"
        " without checkpointing"
        + (
            f", {_largest(tr.largest_checkpointed, tr.micro_batch)} with it"
            if tr.largest_checkpointed is not None
            else ""
        ),
    ]
    pl, cp = tr.plain, tr.checkpointed
    extra = tr.flops_checkpointed / tr.flops_plain - 1 if tr.flops_plain else 0.0
    lines += [
        f"gradient checkpointing at micro-batch {tr.micro_batch}: activations {_g(pl.activations)}"
        f" -> {_g(cp.activations)}, step peak {_g(pl.peak)} -> {_g(cp.peak)}"
        f" (saves {_g(pl.peak - cp.peak)}), training FLOPs {extra:+.0%} (recomputed forwards)",
        f"  {_one(tr.smallest)}: total {_g(tr.total(tr.one_plain))} without,"
        f" {_g(tr.total(tr.one_checkpointed))} with: {_needed(tr, target)}",
        "",
    ]
    per_view = ", ".join(f"{v} {inf.windows[v]}" for v in inf.views)
    crop = f" + carpal crop stage {inf.crop_members} members" if inf.crop_members else ""
    lines += [
        f"inference at infer.batch_size={inf.batch}: {inf.members} member"
        f"{'s' if inf.members > 1 else ''}{crop}, "
        f"windows per view: {per_view}; {inf.forwards_per_image} forwards per test image",
        f"  weights            {_g(inf.member_weight_bytes * (inf.members + inf.crop_members)):>10}"
        f"  exact: every member resident ({_g(inf.member_weight_bytes)} each)",
        f"  peak               {_g(inf.peak):>10}  exact, weights included; at that moment: "
        + _at_peak(inf.at_peak),
        f"  total              {_g(inf.peak + fw.on(inf.peak)):>10}  with the allowance:"
        f" {_fits(inf.peak + fw.on(inf.peak), target)}",
    ]
    if inf.other_experiments:
        lines.append(
            f"  (members of {', '.join(inf.other_experiments)} are taken to be this model)"
        )
    lines += ["", *_flops_lines(p)]
    return "\n".join(lines)


def _correction(n: int) -> str:
    """``n``: CUDA minus CPU-device activations."""
    if abs(n) < MiB:
        return f"on the CPU device {-n / 1024:+.0f} KiB"
    why = ": CPU autocast keeps some operators in float32 that CUDA runs in float16"
    return f"on the CPU device {-n / MiB:+.1f} MiB" + (why if n < 0 else "")


def _at_peak(live: dict[str, int]) -> str:
    order = {c: i for i, c in enumerate(CATEGORIES)}
    items = sorted(live.items(), key=lambda kv: order.get(kv[0], 99))
    return ", ".join(f"{k} {_g(v)}" for k, v in items if v >= MiB // 10)


def _largest(n: int, recipe: int) -> str:
    if n == 0:
        return "none (not one image)"
    if n >= recipe:
        return f"{n} (the recipe's {recipe} fits)"
    return f"{n} (the recipe's {recipe} does not: train.micro_batch={n} or auto)"


def _one(smallest: int) -> str:
    if smallest == 1:
        return "one image"
    return (
        f"{smallest} images (the fewest it trains on: BatchNorm after a global pooling needs"
        " 2 per forward)"
    )


def _needed(tr: TrainingPlan, target: int) -> str:
    one = _one(tr.smallest).split(" (")[0]
    if tr.total(tr.one_plain) <= target:
        return f"not needed to fit {one}"
    if tr.total(tr.one_checkpointed) <= target:
        return f"needed to fit {one}"
    return f"{one} does not fit even with it: lower data.image_size or data.patch_size"


def epoch_seconds(p: RecipePlan, card_tflops: float, utilisation: float = 1.0) -> float:
    tr = p.training
    flops = tr.flops_checkpointed if tr.checkpointing else tr.flops_plain
    return EPOCH_IMAGES * flops / (card_tflops * 1e12 * utilisation)


def test_set_seconds(p: RecipePlan, card_tflops: float, utilisation: float = 1.0) -> float:
    return TEST_IMAGES * p.inference.flops_per_image / (card_tflops * 1e12 * utilisation)


def _flops_lines(p: RecipePlan) -> list[str]:
    tr, inf = p.training, p.inference
    lines = [
        f"FLOPs (convolutions and matrix products; a multiply-add is 2): training "
        f"{tr.flops_plain / 1e12:.3g} TFLOP per image (forward + backward; "
        f"{tr.flops_checkpointed / 1e12:.3g} with checkpointing), inference "
        f"{inf.flops_per_image / 1e12:.3g} TFLOP per test image",
        f"time at the dense FP16/BF16 tensor-core peak (a floor) and at {UTILISATION:.0%} of"
        f" it (an estimate): an epoch of {EPOCH_IMAGES} images, the test set of {TEST_IMAGES}",
        f"  {'card':<11}{'TFLOPS':>7}  {'epoch floor':>11}  {'estimate':>9}  "
        f"{'test floor':>10}  {'estimate':>9}",
    ]
    for c in CARDS:
        e, t = epoch_seconds(p, c.tflops), test_set_seconds(p, c.tflops)
        lines.append(
            f"  {c.name:<11}{c.tflops:>7.0f}  {_t(e):>11}  {_t(e / UTILISATION):>9}  "
            f"{_t(t):>10}  {_t(t / UTILISATION):>9}" + (f"   ({c.note})" if c.note else "")
        )
    return lines


__all__ = [
    "FRAMEWORK",
    "Framework",
    "GiB",
    "RecipePlan",
    "epoch_seconds",
    "fits_at_all",
    "format_plan",
    "plan_recipe",
    "planned_micro_batch",
    "test_set_seconds",
]
