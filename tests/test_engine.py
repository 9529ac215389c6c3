"""train_one_epoch's switches each do what they say (EMA, bf16 autocast, gradient
accumulation, channels_last), it logs every named loss part, train_step hands the loss
every key of the batch (a registered term reads one the library never names), it is the
library's only backward, and validate's Dice equals the dense leaderboard Dice.

Each test watches the effect inside the model or on the weights, so it fails when the
switch is ignored.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from bonecomp.config import LossConfig
from bonecomp.data.annotations import load_annotation
from bonecomp.data.cache import CacheSpec, open_cache
from bonecomp.data.dataset import BoneDataset, to_float_image
from bonecomp.data.layout import discover
from bonecomp.data.rasterize import coverage
from bonecomp.engine import Budget, Epoch, StepContext, train_one_epoch, train_step, validate
from bonecomp.losses import build_loss, register_loss
from bonecomp.testing import dense_validation_dice

CPU = torch.device("cpu")
C, S = 29, 16


class TinyNet(nn.Module):
    """Two convs, no batch norm (a batch of 4 and two of 2 then see the same gradient)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass


def batches(n_images: int, batch: int, compact: bool = False, seed: int = 1) -> list[dict]:
    """A hand-made loader: the same images whatever the batch size."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.randint(0, 256, (n_images, S, S), generator=g, dtype=torch.uint8)
    masks = (torch.rand(n_images, C, S, S, generator=g) < 0.3).to(torch.uint8)
    out = []
    for b in range(0, n_images, batch):
        img, m = grey[b : b + batch], masks[b : b + batch]
        if not compact:
            img, m = img.float().div(255)[:, None].expand(-1, 3, -1, -1).contiguous(), m.float()
        out.append({"image": img, "mask": m, "index": torch.arange(b, b + len(img))})
    return out


def run(model, loader, **ctx) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctx = StepContext(CPU, progress=False, **ctx)
    loss = build_loss(LossConfig(terms={"bce": 1.0}))  # a mean over pixels
    return train_one_epoch(model, loader, opt, NoSchedule(), loss, ctx, Epoch(0))


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_equals_one_big_batch():
    big, accum = TinyNet(), TinyNet()
    start = params(big)
    out_big = run(big, batches(4, 4))
    out_accum = run(accum, batches(4, 2), accum_steps=2)
    assert out_big["num_updates"] == out_accum["num_updates"] == 1
    moved = (params(big) - start).abs().max()
    assert moved > 1e-3  # the step is large enough to tell right from wrong
    torch.testing.assert_close(params(accum), params(big), rtol=1e-5, atol=1e-6)


class Snapshots(nn.Module):
    """Wraps a model and keeps its weights as each forward sees them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(params(self.net))
        return self.net(x)


def test_ema_averages_the_weights_of_every_update():
    decay = 0.6
    model = Snapshots(TinyNet())
    ema = ModelEmaV3(model, decay=decay)
    out = run(model, batches(6, 2), ema=ema)
    assert out["num_updates"] == 3
    w1, w2, w3 = model.seen[1], model.seen[2], params(model.net)  # after updates 1, 2, 3
    # timm's ModelEmaV3: step 1 copies the model (decay 0), later steps lerp by `decay`
    want = decay * (decay * w1 + (1 - decay) * w2) + (1 - decay) * w3
    got = params(ema.module.net)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - w3).abs().max() > 1e-3  # an average, not the last weights


def test_bf16_autocast_runs_the_forward_in_bf16():
    seen: list[torch.dtype] = []
    model = TinyNet()
    model.body.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = run(model, batches(4, 2), amp_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16, torch.bfloat16] and np.isfinite(out["loss"])
    seen.clear()
    run(model, batches(4, 2))
    assert seen == [torch.float32, torch.float32]


@pytest.mark.parametrize("compact", [False, True])
def test_channels_last_reaches_the_model(compact):
    formats: list[tuple[bool, bool]] = []

    def record(module, args):
        x = args[0]
        formats.append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()))

    model = TinyNet()
    model.register_forward_pre_hook(record)
    run(model, batches(4, 2, compact), channels_last=True)
    assert formats == [(True, False)] * 2
    formats.clear()
    run(model, batches(4, 2, compact), channels_last=False)
    assert formats == [(False, True)] * 2


class NearTruth(nn.Module):
    """Logits like a fair model's: each known cached image's soft truth at 64 px, blurred
    by noise (looked up by the image itself), so masks have real, wobbly boundaries."""

    def __init__(self, cache, indices: list[int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.known = []
        for i in indices:
            image = to_float_image(torch.from_numpy(cache.image(i)))
            soft = coverage(cache.polygons(i), cache.src_hw(i), (cache.size, cache.size))
            x = 8 * (torch.from_numpy(soft).float() / 255 - 0.5)
            self.known.append((image, x + 2 * torch.randn(x.shape, generator=g)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([next(y for im, y in self.known if torch.equal(im, xi)) for xi in x])


def test_validation_dice_equals_the_dense_leaderboard_dice(tiny_root, tmp_path):
    """validate's sparse upsample + bounding-box truth == full-size upsample, sigmoid > 0.5,
    cv2.fillPoly masks, per (image, class) Dice, mean over images then classes."""
    df = discover(tiny_root)
    cache = open_cache(df, tmp_path / "cache", CacheSpec(64), workers=1, progress=False)
    indices = [0, 3, 4, 7, 9]
    loader = DataLoader(BoneDataset(cache, indices, None, compact=True), batch_size=2)
    model = NearTruth(cache, indices)
    logits: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, i, o: logits.extend(o.detach().clone()))
    loss = build_loss(LossConfig())
    ctx = StepContext(CPU, progress=False)
    got = validate(model, loader, cache, loss, ctx)
    assert got.table.n_images == len(indices) == len(logits)

    def dense(threshold: float) -> np.ndarray:
        rows = []
        for idx, x in zip(indices, logits, strict=True):
            png = cv2.imread(str(df["image_path"][idx]), cv2.IMREAD_UNCHANGED)
            polys = load_annotation(df["json_path"][idx])
            rows.append(dense_validation_dice(x, polys, png.shape[:2], threshold))
        return np.mean(rows, axis=0)

    want = dense(0.5)
    assert 0.3 < want.mean() < 0.99 and ((want > 0.05) & (want < 0.99)).sum() >= 10
    np.testing.assert_allclose(got.table.per_class, want, rtol=0, atol=1e-9)
    assert abs(got.metrics["dice"] - want.mean()) < 1e-9
    # the comparison can fail: another threshold moves the Dice well past the tolerance
    logits.clear()
    other = validate(model, loader, cache, loss, ctx, thresholds=0.7)
    assert abs(other.metrics["dice"] - want.mean()) > 1e-4
    np.testing.assert_allclose(other.table.per_class, dense(0.7), rtol=0, atol=1e-9)


def test_metrics_hold_every_loss_part():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 3, padding=1)
    batches = [
        {
            "image": torch.rand(2, 3, 8, 8),
            "mask": (torch.rand(2, 2, 8, 8) > 0.5).float(),
            "index": torch.tensor([2 * i, 2 * i + 1]),
        }
        for i in range(3)
    ]
    loss_fn = build_loss(LossConfig(terms={"bce": 1.0, "focal": 0.5, "jaccard": 0.0}))
    expected = {"loss_bce": 0.0, "loss_focal": 0.0}
    with torch.no_grad():
        for b in batches:
            for k, v in loss_fn(model(b["image"]), b)[1].items():
                expected[k] += v / len(batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # every batch sees the same weights
    out = train_one_epoch(
        model,
        batches,
        opt,
        SimpleNamespace(step_update=lambda n: None),
        loss_fn,
        StepContext(torch.device("cpu"), progress=False),
        Epoch(0),
    )
    assert {"loss", "loss_bce", "loss_focal"} <= set(out) and "loss_jaccard" not in out
    assert "bce" not in out and "dice" not in out
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, rel=1e-5)
    assert out["loss"] == pytest.approx(expected["loss_bce"] + 0.5 * expected["loss_focal"])
    assert out["num_updates"] == 3


def test_a_registered_term_reads_a_key_only_the_dataset_names(registries):
    """A term from outside the package reads ``batch["weight"]``: train_step moves it with
    the batch, re-cuts it (and a list key) with the micro-batch, and logs the term."""
    seen = []

    @register_loss("weighted_bce")
    def weighted_bce(cfg: LossConfig):
        def term(logits: torch.Tensor, batch: dict) -> torch.Tensor:
            seen.append((batch["index"].tolist(), batch["weight"][:, 0, 0, 0].tolist(),
                         batch["name"]))  # fmt: skip
            return F.binary_cross_entropy_with_logits(logits, batch["mask"], batch["weight"])

        return term

    data = batches(6, 3)
    for b in data:  # what a dataset wrapper adds: a per-image weight and a name
        b["weight"] = (b["index"].float() + 1).view(-1, 1, 1, 1).expand(-1, 1, S, S).clone()
        b["name"] = [f"img{i}" for i in b["index"].tolist()]
    loss_fn = build_loss(LossConfig(terms={"bce": 1.0, "weighted_bce": 0.5}))
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # every forward sees the same weights
    ctx = StepContext(CPU, progress=False, micro_batch=2)  # batches of 3 re-cut as 2, 2, 2
    out = train_step(model, data, opt, loss_fn, ctx)
    assert seen == [
        ([2 * k, 2 * k + 1], [2 * k + 1.0, 2 * k + 2.0], [f"img{2 * k}", f"img{2 * k + 1}"])
        for k in range(3)
    ]
    assert out["images"] == 6 and out["forwards"] == 3
    with torch.no_grad():
        x = torch.cat([b["image"] for b in data])
        y, w = torch.cat([b["mask"] for b in data]), torch.cat([b["weight"] for b in data])
        want = np.mean([F.binary_cross_entropy_with_logits(model(x[s]), y[s], w[s]).item()
                        for s in (slice(0, 2), slice(2, 4), slice(4, 6))])  # fmt: skip
    assert out["loss_weighted_bce"] == pytest.approx(want, rel=1e-5)
    assert out["loss"] == pytest.approx(out["loss_bce"] + 0.5 * want, rel=1e-5)


def test_the_step_is_the_only_backward_in_the_library():
    """Training, the doctor and the batch-size probe share ``engine.train_step``."""
    package = Path(__file__).resolve().parents[1] / "bonecomp"
    hits = [
        f"{p.relative_to(package)}:{n}"
        for p in sorted(package.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if ".backward(" in line
    ]
    assert len(hits) == 1 and hits[0].startswith("engine.py:"), hits


class _Clocked(list):
    """A loader whose every batch takes one second on the test's clock."""

    def __init__(self, items: list[dict], now: list[float]) -> None:
        super().__init__(items)
        self.now = now

    def __iter__(self):
        for item in list.__iter__(self):
            self.now[0] += 1.0
            yield item


class _Recorder:
    """A real timm cosine schedule over ``total`` updates that records each position."""

    def __init__(self, opt: torch.optim.Optimizer, total: int) -> None:
        from timm.scheduler import CosineLRScheduler

        self.cosine = CosineLRScheduler(opt, t_initial=total, lr_min=1e-4, t_in_epochs=False)
        self.seen: list[int] = []

    def step_update(self, num_updates: int) -> None:
        self.seen.append(num_updates)
        self.cosine.step_update(num_updates)


def _budgeted_pass(budget, loader, model, num_updates: int = 0, index: int = 0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = _Recorder(opt, budget.total_updates)
    loss = build_loss(LossConfig(terms={"bce": 1.0}))
    out = train_one_epoch(
        model, loader, opt, schedule, loss, StepContext(CPU, progress=False),
        Epoch(index, num_updates, budget),
    )  # fmt: skip
    return out, schedule.seen, opt


def test_a_budget_that_binds_anneals_to_the_floor_by_the_deadline_and_stops_the_pass():
    """A 4 s budget over 100 planned updates at 1 s per update: after update 2 the pace
    projects 100 s, so the clock takes over at position 2 and moves linearly to 100 at
    the 4 s deadline (51 halfway); the pass stops there although 10 batches were planned,
    with the real cosine at its floor."""
    now = [0.0]
    budget = Budget(4.0, 100, clock=lambda: now[0])
    out, seen, opt = _budgeted_pass(budget, _Clocked(batches(10, 1), now), TinyNet())
    assert seen == [1, 2, 51, 100]
    assert budget.takeover == (2, 2.0)
    assert out["num_updates"] == 4  # the updates really made (EMA, resume) stay counted
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_a_slow_start_does_not_move_an_unreached_budget():
    """The issue's case: a 100 s budget, 100 updates, the first taking 5 s (workers,
    caches, compilation), then 0.9 s each: the finish projected from the pace after the
    first update (94.1 s) fits, so the schedule is at the update count every time, bit
    for bit the positions a run without a budget gets (the old rule gave 5,6,6,7,8,...)."""
    now = [0.0]

    class SlowStart(list):
        def __iter__(self):
            for i, item in enumerate(list.__iter__(self)):
                now[0] += 5.0 if i == 0 else 0.9
                yield item

    budget = Budget(100.0, 100, clock=lambda: now[0])
    _, seen, _ = _budgeted_pass(budget, SlowStart(batches(100, 1)), TinyNet())
    assert seen == list(range(1, 101)) and budget.takeover is None


def test_the_clock_takes_over_when_the_pace_slows_and_never_goes_back():
    """Fits at first (0.5 s per update over 100 updates in 100 s), then each update takes
    3 s: the clock takes over on the first update whose projection overruns, the
    positions never decrease, and after a resume (``spent``, ``takeover``) a new process
    keeps following the clock from where the first left it."""
    now = [0.0]

    class Slowing(list):
        def __iter__(self):
            for i, item in enumerate(list.__iter__(self)):
                now[0] += 0.5 if i < 20 else 3.0
                yield item

    budget = Budget(100.0, 100, clock=lambda: now[0])
    _, seen, _ = _budgeted_pass(budget, Slowing(batches(30, 1)), TinyNet())
    assert seen[:20] == list(range(1, 21))  # 20 updates at 0.5 s: fits
    p0 = budget.takeover[0]
    assert p0 > 20 and seen == sorted(seen) and seen[-1] > 30
    later = Budget(100.0, 100, spent=budget.elapsed(), takeover=budget.takeover,
                   clock=lambda: now[0])  # fmt: skip
    _, more, _ = _budgeted_pass(later, _Clocked(batches(3, 1), now), TinyNet(), 30, 1)
    assert more[0] >= seen[-1] and more == sorted(more) and more[-1] > 33
