"""The training side of the plan: the recipe's own training step, run on fake tensors.

``StepTracer`` builds the recipe's model, optimiser (timm's, as training builds it,
with ``foreach`` as torch picks it on CUDA) and loss on a fake CPU device and runs
``engine.train_step`` on a compact uint8 batch as the loader yields it, under a
``MemoryTrace`` and torch's ``FlopCounterMode``. The first step creates the optimiser's
state; every figure is a later step's (the steady state). The autograd engine will not
run a backward pass on a fake CUDA device (it wants a CUDA context), so the step runs on
the fake CPU with CPU autocast to the same dtype, and the activations are then taken
from the same forward and loss on the fake CUDA device under CUDA autocast (the dtypes a
GPU picks per operator): the step's peak is corrected by the difference, which is
reported (``StepFigures.activations_cpu``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import Config
from bonecomp.engine import StepContext, autocast, to_device, train_step
from bonecomp.losses import build_loss
from bonecomp.models import SegModel, create_model
from bonecomp.models.checkpointing import set_grad_checkpointing
from bonecomp.optim import build_optimizer
from bonecomp.plan.fake import (
    ACTIVATIONS,
    BUFFERS,
    CUDA_BLOCK,
    GRADIENTS,
    INPUTS,
    OPTIMIZER,
    WEIGHT_COPIES,
    WEIGHTS,
    MemoryTrace,
    cuda_autocast,
    fake_mode,
    storage_bytes,
)

MAX_MICRO_BATCH = 1024  # the search for the largest micro-batch stops here


@dataclass
class StepFigures:
    """One training step at ``micro_batch`` images per forward (bytes, FLOPs)."""

    micro_batch: int
    checkpointing: bool
    peak: int  # the step's peak of live tensors, as max_memory_allocated reads it
    at_peak: dict[str, int]  # what was alive at the peak, by category (sums to peak)
    activations: int  # forward + loss, alive when the backward starts (CUDA autocast)
    cuda_correction: int  # activations on CUDA minus on the CPU trace (CUDA autocast)
    flops: int  # forward + backward (+ recomputation) of the micro-batch
    in_step: bool  # the peak is in the optimiser step (else forward/backward)
    gradients: int  # every gradient, alive from the backward's end to the optimiser step


def side_of(cfg: Config) -> int:
    """The side of one training input: the patch, or the whole (resized) image."""
    return cfg.data.patch_size or cfg.data.image_size


def recipe_micro_batch(cfg: Config) -> int:
    """Images per forward as the recipe trains (``auto``: the batch, what it tries first)."""
    mb = cfg.train.micro_batch
    return min(mb, cfg.train.batch_size) if isinstance(mb, int) else cfg.train.batch_size


def build_model(cfg: Config) -> SegModel:
    """The recipe's model without downloaded weights (the bytes are the same)."""
    return create_model(cfg.model.model_copy(update={"encoder_weights": None})).train()


def compact_batch(m: int, side: int, soft: bool) -> dict[str, torch.Tensor]:
    """``m`` images and masks as the training loader yields them (uint8)."""
    top = 256 if soft else 2
    return {
        "image": torch.randint(0, 256, (m, side, side), dtype=torch.uint8),
        "mask": torch.randint(0, top, (m, NUM_CLASSES, side, side), dtype=torch.uint8),
        "index": torch.arange(m),
    }


class StepTracer:
    """The recipe's training step (``engine.train_step``) on fake tensors, at any
    micro-batch, with and without gradient checkpointing. ``dtype``: the autocast dtype
    of the GPU (float16 and bfloat16 take the same bytes); None when ``train.amp`` is off.

    The CUDA autocast correction of the activations is computed at the recipe's
    micro-batch (``reference``) and scaled by the images elsewhere (it is per image:
    the dtypes an operator saves in); it applies to the forward/backward part of the
    step only (the optimiser step holds no activations). The search for the largest
    micro-batch skips the optimiser's update at the sizes it tries (``peak_at``).
    """

    def __init__(
        self,
        cfg: Config,
        dtype: torch.dtype | None = torch.float16,
        round_to: int = CUDA_BLOCK,
        foreach: bool | None = True,
    ) -> None:
        self.cfg = cfg
        self.dtype = dtype if cfg.train.amp else None
        self.side = side_of(cfg)
        self.reference = recipe_micro_batch(cfg)
        self.mode = fake_mode()
        cpu = torch.device("cpu")
        with self.mode, cpu:
            self.model = build_model(cfg)
            self.optimizer = build_optimizer(self.model, cfg.train)
        for group in self.optimizer.param_groups:
            if "foreach" in group:  # True: CUDA's default, one kernel over all tensors
                group["foreach"] = foreach
        self.loss_fn = build_loss(cfg.loss)
        self.ctx = StepContext(
            cpu,
            amp_dtype=self.dtype,
            grad_clip=cfg.train.grad_clip,
            channels_last=cfg.train.channels_last is not False,  # auto: on, on CUDA
            progress=False,
            soft_targets=cfg.data.soft_targets,
            oom_retry=False,
            check_finite=False,
        )
        self.trace = trace = MemoryTrace(round_to)
        params = list(self.model.parameters())
        trace.track(params, WEIGHTS)
        trace.track(list(self.model.buffers()), BUFFERS)
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: trace.retag(p.grad, GRADIENTS))
        self.optimizer.register_step_pre_hook(lambda *_: setattr(trace, "stepping", True))
        self.optimizer.register_step_post_hook(lambda *_: setattr(trace, "stepping", False))
        self.parameters = sum(p.numel() for p in params)
        self.weight_bytes = storage_bytes(params)
        self.buffer_bytes = storage_bytes(list(self.model.buffers()))
        self._cuda_model: SegModel | None = None
        self._known: dict[tuple[int, bool], StepFigures] = {}
        self._correction: dict[bool, int] = {}
        self._ref_step: dict[bool, tuple[int, int]] = {}
        self._peaks: dict[tuple[int, bool], int] = {}
        state = self._create_state()
        self.optimizer_bytes = storage_bytes(state)
        self.optimizer_host_bytes = storage_bytes(  # the "step" counters, on the host
            [t for s in self.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor) and t.dim() == 0]
        )  # fmt: skip
        self.optimizer_kinds = sorted(
            {k for s in self.optimizer.state.values() for k, t in s.items()
             if isinstance(t, torch.Tensor) and t.dim() > 0}
        )  # fmt: skip

    def _used_parameters(self) -> list[torch.Tensor]:
        """The parameters the loss reaches (the ones that get gradients, and so optimiser
        state): read off the autograd graph of one forward, without a backward."""
        with self.mode, MemoryTrace(), torch.device("cpu"):
            batch = compact_batch(2, self.side, self.cfg.data.soft_targets)
            on_device = to_device(batch, self.ctx)
            with autocast(self.ctx):
                logits = self.model(on_device["image"])
            loss, _ = self.loss_fn(logits, on_device)
        used, seen, todo = set(), set(), [loss.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf
            if variable is not None:
                used.add(id(variable))
            todo.extend(f for f, _ in fn.next_functions)
        return [p for p in self.model.parameters() if id(p) in used]

    def _create_state(self) -> list[torch.Tensor]:
        """One optimiser step on zero gradients of the parameters the loss reaches: the
        state every later step holds (the 0-dim ``step`` counters of torch's Adam family
        live on the host)."""
        params = self._used_parameters()
        with self.mode, self.trace, self.trace.phase(OPTIMIZER):
            for p in params:
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return [
            t
            for s in self.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        ]

    # --- one step -------------------------------------------------------------------
    def figures(self, m: int, checkpointing: bool = False) -> StepFigures:
        """The whole step at ``m`` images per forward (computed once per (m, checkpointing))."""
        key = (m, checkpointing)
        if key not in self._known:
            acts_cpu, flops, phases, inputs = self._run(m, checkpointing)
            if m == self.reference:  # the optimiser step's peak and the input batch then
                self._ref_step[checkpointing] = (phases.get("step", (0, {}))[0], inputs)
            correction = self._cuda_correction(m, checkpointing, acts_cpu)
            fb_peak, fb_live = phases["forward/backward"]
            fb_live = dict(fb_live)
            fb_live[ACTIVATIONS] = fb_live.get(ACTIVATIONS, 0) + correction
            step_peak, step_live = phases.get("step", (0, {}))
            in_step = step_peak > fb_peak + correction
            peak, live = (step_peak, step_live) if in_step else (fb_peak + correction, fb_live)
            self._known[key] = StepFigures(
                m, checkpointing, peak, {k: v for k, v in live.items() if v},
                acts_cpu + correction, correction, flops, in_step,
                step_live.get(GRADIENTS, 0),
            )  # fmt: skip
        return self._known[key]

    def _run(self, m: int, checkpointing: bool, step: bool = True) -> tuple[int, int, dict, int]:
        """(activations when the backward starts, FLOPs, the phases' peaks, the input
        batch's bytes) of one step; without ``step`` the optimiser's update is skipped
        (clipping and the rest of ``train_step`` run)."""
        set_grad_checkpointing(self.model, checkpointing)
        if not step:
            self.optimizer.step = lambda *args, **kwargs: None  # the instance's, for this run
        try:
            with self.mode, self.trace:
                self.trace.reset_peak()
                with self.trace.phase(INPUTS), torch.device("cpu"):
                    batch = compact_batch(m, self.side, self.cfg.data.soft_targets)
                inputs = self.trace.bytes_of(INPUTS)
                train_step(self.model, [batch], self.optimizer, self.loss_fn, self.ctx)
                del batch
        finally:
            set_grad_checkpointing(self.model, False)
            self.optimizer.__dict__.pop("step", None)
        t = self.trace
        end = t.forward_end or {}
        acts = end.get(ACTIVATIONS, 0) + end.get(WEIGHT_COPIES, 0)
        return acts, t.flops, dict(t.phase_peaks), inputs

    def _cuda_correction(self, m: int, checkpointing: bool, acts_cpu: int) -> int:
        """CUDA minus CPU activations: computed at the reference micro-batch, scaled by
        the images elsewhere."""
        if m == self.reference:
            self._correction[checkpointing] = self.cuda_activations(m, checkpointing) - acts_cpu
            return self._correction[checkpointing]
        if checkpointing not in self._correction:
            self.figures(self.reference, checkpointing)
        return round(self._correction[checkpointing] * m / self.reference)

    def cuda_activations(self, m: int, checkpointing: bool) -> int:
        """Bytes the forward and the loss leave alive for the backward on a fake CUDA
        device under CUDA autocast (what ``engine._accumulate`` runs before backward)."""
        cuda = torch.device("cuda")
        if self._cuda_model is None:
            with self.mode, cuda:
                self._cuda_model = build_model(self.cfg)
        model = self._cuda_model
        set_grad_checkpointing(model, checkpointing)
        ctx = dataclasses.replace(self.ctx, device=cuda)
        trace = MemoryTrace(self.trace.round_to)
        try:
            with self.mode:
                with cuda:
                    batch = compact_batch(m, self.side, self.cfg.data.soft_targets)
                trace.track(list(model.parameters()), WEIGHTS)
                with trace:
                    on_device = to_device(batch, ctx)
                    with cuda_autocast(self.dtype):
                        logits = model(on_device["image"])
                    loss, _ = self.loss_fn(logits, on_device)
                    acts = trace.bytes_of(ACTIVATIONS) + trace.bytes_of(WEIGHT_COPIES)
                del loss, logits, on_device, batch
        finally:
            set_grad_checkpointing(model, False)
        return acts

    def flops_per_sample(self, checkpointing: bool = False) -> int:
        """Training FLOPs per image (forward + backward, + recomputation when
        checkpointing; the count is linear in the images)."""
        n = self.smallest
        return self.figures(n, checkpointing).flops // n

    @functools.cached_property
    def smallest(self) -> int:
        """The fewest images a training forward takes: 1, or 2 for a model that cannot
        train on one (BatchNorm over a 1 x 1 pooled map, as in DeepLabV3's ASPP, needs
        two values per channel)."""
        try:
            self.figures(1)
        except ValueError as e:
            if "more than 1 value per channel" not in str(e):
                raise
            return 2
        return 1

    # --- the largest micro-batch under a budget ------------------------------------------
    def peak_at(self, m: int, checkpointing: bool = False) -> int:
        """The step's peak at ``m`` images: the whole step's where it was computed, else
        the step computed without the optimiser's update, whose own peak (weights,
        gradients, state, its temporaries and the input batch) is the whole step's at
        the recipe's micro-batch with this input batch instead (nothing else is alive
        then; a test checks the two agree)."""
        known = self._known.get((m, checkpointing))
        if known is not None:
            return known.peak
        self.figures(self.reference, checkpointing)  # the reference's step phase
        key = (m, checkpointing)
        if key not in self._peaks:
            acts_cpu, _, phases, inputs = self._run(m, checkpointing, step=False)
            fb = phases["forward/backward"][0] + self._cuda_correction(m, checkpointing, acts_cpu)
            ref_step, ref_inputs = self._ref_step[checkpointing]
            step = ref_step - ref_inputs + inputs if ref_step else 0
            self._peaks[key] = max(fb, step)
        return self._peaks[key]

    def largest_fit(self, budget: int, checkpointing: bool = False) -> int:
        """The largest micro-batch whose step peak stays within ``budget`` bytes (0: not
        even one image), found by computing steps: a line through the two nearest known
        peaks proposes the next size (the peak grows almost linearly with the images),
        until the size fits and the one above it does not."""
        n = self.smallest
        one = self.figures(n, checkpointing)
        if one.peak > budget:
            return 0
        k = max(self.reference, n + 1)
        known = {n: one.peak, k: self.peak_at(k, checkpointing)}
        return largest_within(lambda n: self.peak_at(n, checkpointing), budget, known)


def largest_within(
    peak: Callable[[int], int], budget: int, known: dict[int, int], limit: int = MAX_MICRO_BATCH
) -> int:
    """The largest n up to ``limit`` with ``peak(n) <= budget``, for a ``peak`` that grows
    with n (``known``: peaks already computed, the smallest of them within the budget)."""
    pts = dict(known)
    while True:
        lo = max(n for n, p in pts.items() if p <= budget)
        hi = min((n for n, p in pts.items() if p > budget and n > lo), default=None)
        if hi == lo + 1 or (hi is None and lo >= limit):
            return lo
        below = [n for n in pts if n < lo]
        other = hi if hi is not None else (max(below) if below else None)
        if other is None:
            guess = 2 * lo
        else:
            slope = (pts[other] - pts[lo]) / (other - lo)
            guess = lo + int((budget - pts[lo]) // slope) if slope > 0 else 2 * lo
        guess = min(max(guess, lo + 1), hi - 1 if hi is not None else limit)
        pts[guess] = peak(guess)


def steps_per_epoch(cfg: Config, images: int) -> int:
    return math.ceil(images / cfg.train.batch_size)
