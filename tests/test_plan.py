"""The GPU plan computed without a GPU (``bonecomp.plan``, ``scripts/doctor.py --plan``):
checked against a measured CPU step, a hand count of FLOPs, and its own shortcuts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bonecomp import models
from bonecomp.config import load_config
from bonecomp.plan import GiB, format_plan, plan_recipe, planned_micro_batch
from bonecomp.plan.fake import fake_mode
from bonecomp.plan.inference import trace_inference
from bonecomp.plan.training import StepTracer, largest_within
from bonecomp.testing import DEMO_CONFIG, REPO, as_overrides, measured_cpu_step

SMALL = {  # the demo recipe, small enough to trace in seconds
    "data.image_size": 64,
    "model.encoder_weights": None,
    "train.batch_size": 4,
}


def small(config=DEMO_CONFIG, **extra):
    return load_config(config, as_overrides({**SMALL, **extra}))


@pytest.fixture(scope="module")
def tracer() -> StepTracer:
    return StepTracer(small())


# ------------------------------------------------------------------- measured on a CPU
@pytest.mark.parametrize(
    ("config", "side"),
    [
        (DEMO_CONFIG, 192),  # U-Net / ResNet-18
        (REPO / "configs" / "unet_effb0_2048.yaml", 128),  # U-Net / EfficientNet-B0
    ],
)
def test_the_plan_agrees_with_a_measured_cpu_step(config, side):
    """The same step on real tensors, its memory measured by torch's profiler (every
    allocation of the real kernels, sorted by what each tensor became): the weights and
    the optimiser state are the same bytes, the computed peak is within 2 % of the
    measured one (what the plan cannot see are the CPU kernels' scratch buffers, as it
    cannot see cuDNN's workspace on a GPU)."""
    cfg = small(config, **{"data.image_size": side, "train.batch_size": 2, "train.amp": False})
    peak, at_peak = measured_cpu_step(cfg, 2)
    tracer = StepTracer(cfg, dtype=None, round_to=1, foreach=None)  # the CPU's own step
    f = tracer.figures(2)
    assert at_peak["PARAMETER"] == tracer.weight_bytes
    # the optimiser's 0-dim step counters are on the host on a GPU, here on the CPU too
    assert at_peak["OPTIMIZER_STATE"] == tracer.optimizer_bytes + tracer.optimizer_host_bytes
    assert f.activations > 0.3 * peak  # a step where the activations weigh
    assert abs(f.peak - peak) <= 0.02 * peak, (f.peak, peak, f.at_peak, at_peak)


# ------------------------------------------------------------------------------ FLOPs
class ConvStack(nn.Module):
    """Four plain convolutions (one strided, one depthwise), no encoder, no decoder."""

    LAYERS = (  # (in, out, kernel, stride, groups)
        (3, 8, 3, 1, 1),
        (8, 16, 3, 2, 1),
        (16, 16, 3, 1, 16),
        (16, 29, 1, 1, 1),
    )

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(nn.Conv2d(i, o, k, s, k // 2, groups=g) for i, o, k, s, g in self.LAYERS)
        )
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up(self.convs(x))

    @property
    def output_bias(self):
        return self.convs[-1].bias


def hand_count(side: int) -> tuple[int, int]:
    """(forward FLOPs of one image, of the first layer): 2 x Cout x Cin/groups x k^2 per
    output pixel."""
    total, first = 0, None
    for i, o, k, s, g in ConvStack.LAYERS:
        side = side // s
        flops = 2 * o * (i // g) * k * k * side * side
        total += flops
        first = flops if first is None else first
    return total, first


def test_flops_match_a_hand_count_of_a_convolution_stack(registries):
    """Training: forward + each layer's weight gradient + each layer's input gradient
    but the first's (the image needs none), each the forward's cost; inference: the
    forward per TTA view. torch's own formula (2.14) counts the depthwise layer's
    weight gradient 16 times over."""
    models.register_arch("convstack", lambda *a: ConvStack())
    cfg = small(**{"model.arch": "convstack", "data.image_size": 64})
    fwd, first = hand_count(64)
    tracer = StepTracer(cfg)
    assert tracer.flops_per_sample() == 3 * fwd - first
    assert tracer.figures(4).flops == 4 * (3 * fwd - first)
    assert trace_inference(cfg).flops_per_image == 2 * fwd  # views none and hflip
    from torch.utils.flop_counter import FlopCounterMode

    with fake_mode():
        net, x = ConvStack(), torch.rand(1, 3, 64, 64)
        counter = FlopCounterMode(display=False)
        with counter:
            net(x).sum().backward()
    depthwise = 2 * 16 * 9 * 32 * 32
    assert counter.get_total_flops() == 3 * fwd - first + 15 * depthwise


# --------------------------------------------------------------------- CUDA autocast
def test_activations_follow_the_cuda_autocast_dtype():
    """float16 and bfloat16 save the same bytes, float32 far more (not twice: the loss
    works on float32 maps either way); and the CUDA figure is the one used: CUDA autocast
    runs DeepLabV3+'s bilinear upsampling in float16 where CPU autocast keeps float32, so
    the CPU-device trace alone would read high."""
    arch = {"model.arch": "deeplabv3plus", "data.image_size": 512}  # activations dominate
    cfg = small(**arch)
    half = StepTracer(cfg, dtype=torch.float16)
    bf16 = StepTracer(cfg, dtype=torch.bfloat16)
    assert half.cuda_activations(4, False) == bf16.cuda_activations(4, False)
    full = StepTracer(small(**arch, **{"train.amp": False}))
    assert full.dtype is None
    ratio = full.cuda_activations(4, False) / half.cuda_activations(4, False)
    assert 1.3 < ratio < 2
    f = half.figures(4)
    assert f.cuda_correction < 0  # less on CUDA than in the CPU-device step
    assert f.activations == half.cuda_activations(4, False)


# ------------------------------------------------------------------ the plan's shortcuts
def test_the_search_steps_give_the_whole_steps_peak(tracer):
    """Sizes tried by the search run without the optimiser's update and take its peak
    from the whole step at the recipe's micro-batch with their own input batch: the same
    figure as the whole step at that size."""
    for m in (1, 3, 6):
        quick = tracer.peak_at(m)
        tracer._known.pop((m, False), None)
        assert quick == tracer.figures(m).peak, m


def test_the_largest_micro_batch_is_computed_not_extrapolated(tracer):
    budget = tracer.figures(4).peak + (tracer.figures(4).peak - tracer.figures(1).peak) // 2
    k = tracer.largest_fit(budget)
    assert k >= 5
    assert tracer.peak_at(k) <= budget < tracer.peak_at(k + 1)
    assert tracer.largest_fit(tracer.figures(1).peak - 1) == 0
    cfg = small()
    assert planned_micro_batch(cfg, budget, torch.bfloat16) == 4  # at most the batch


def test_largest_within_brackets_the_budget():
    calls = []

    def peak(n):  # flat up to 3 images, then 10 per image
        calls.append(n)
        return 100 + 10 * max(n - 3, 0)

    assert largest_within(peak, 200, {1: 100, 2: 100}) == 13
    assert len(calls) <= 4
    assert largest_within(lambda n: n, 10**9, {1: 1}, limit=64) == 64


def test_checkpointing_in_the_plan_saves_activations_for_recomputation(tracer):
    plain, ckpt = tracer.figures(4, False), tracer.figures(4, True)
    assert ckpt.activations < 0.7 * plain.activations
    assert ckpt.flops > 1.2 * plain.flops  # the recomputed forwards
    assert tracer.figures(4, False) is plain  # computed once


def test_inference_replays_give_what_running_every_window_gives():
    """A patch recipe (3 x 3 windows per view at overlap 0.5, two views, three members):
    the forward computed once per shape and replayed gives the peak and FLOPs of running
    them all."""
    cfg = load_config(
        REPO / "configs" / "demo_patch.yaml",
        as_overrides({"data.image_size": 128, "data.patch_size": 64, "infer.batch_size": 2,
                      "infer.ensemble": [{"experiment": "demo_patch", "folds": [0, 1, 2]}]}),
    )  # fmt: skip
    fast, slow = trace_inference(cfg), trace_inference(cfg, replay=False)
    assert fast.windows == {"none": 9, "hflip": 9}
    assert fast.forwards_per_image == 9 * 2 * 3
    assert fast.peak == slow.peak and fast.flops_per_image == slow.flops_per_image
    assert fast.peak > 3 * fast.member_weight_bytes  # every member resident


# -------------------------------------------------------------------- the whole plan
def test_the_doctor_prints_the_plan(capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("doctor_script", REPO / "scripts/doctor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "2", *as_overrides(SMALL)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    for line in ("weights", "optimizer state", "gradients", "activations", "step peak",
                 "framework", "largest micro-batch in 2 GiB", "gradient checkpointing",
                 "inference at infer.batch_size=4", "H100 SXM", "V100 SXM2"):  # fmt: skip
        assert line in out, line
    assert script.main([*argv[: -len(SMALL)], "data.image_size=8192"]) == 1  # nothing fits


def test_a_plan_says_what_is_exact_and_what_is_an_allowance():
    p = plan_recipe(small(**{"train.ema": 0.99}), 1 * GiB, config="demo")
    text = format_plan(p)
    assert "EMA copy" in text and "allowance" in text and "exact" in text
    tr = p.training
    assert tr.ema_bytes == tr.weight_bytes + tr.buffer_bytes
    assert tr.total(tr.at_recipe) > tr.at_recipe.peak + tr.ema_bytes
    assert dataclasses.asdict(p)  # plain data: benchmarks write it as JSON


# ------------------------------------------------------------ train.micro_batch: auto
def test_auto_probes_from_the_computed_plan(tiny_root, tmp_path):
    """On a GPU the probe starts at the plan's size and halves only if it does not fit:
    one probe where the plan is right, where growing from 1 took four; a plan that
    fails is said and the probe grows from 1 as before."""
    from bonecomp import engine
    from bonecomp.memory import MemoryBudget
    from bonecomp.testing import tiny_config
    from bonecomp.training.batch_plan import plan_batch

    cfg = tiny_config(tiny_root, tmp_path, **{"train.micro_batch": "auto", "train.batch_size": 16})
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 29, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ctx = engine.StepContext(torch.device("cpu"), progress=False)
    budget = MemoryBudget(total=1000, bytes_per_image=120)  # 4 fit under 85 %, 8 do not
    limits = []
    plan = plan_batch(cfg, model, opt, ctx, budget, planner=lambda b: limits.append(b) or 4)
    assert plan.micro_batch == 4 and plan.planned == 4 and plan.peak_bytes == {4: 480}
    assert limits == [850] and "computed plan: 4" in plan.describe()
    plan = plan_batch(cfg, model, opt, ctx, budget, planner=lambda b: 8)  # too optimistic
    assert plan.micro_batch == 4 and plan.peak_bytes == {8: 960, 4: 480}
    plan = plan_batch(cfg, model, opt, ctx, MemoryBudget(total=1000, bytes_per_image=900),
                      planner=lambda b: 4)  # fmt: skip
    assert plan.micro_batch == 1 and plan.peak_bytes == {4: None, 2: None, 1: 900}

    def broken(limit):
        raise RuntimeError("no fake kernel")

    plan = plan_batch(cfg, model, opt, ctx, budget, planner=broken)
    assert plan.planned is None and plan.peak_bytes == {1: 120, 2: 240, 4: 480, 8: 960}
