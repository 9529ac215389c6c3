"""Fitting the batch to the device without a GPU: a fake memory budget raises
``torch.OutOfMemoryError``; training, validation and inference halve and go on with the
same updates and outputs; ``auto`` picks the largest micro-batch under the limit;
compiled runs save plain checkpoints."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bonecomp import engine
from bonecomp.checkpoint import load_checkpoint
from bonecomp.checks import check_config
from bonecomp.config import Config, ConfigError, from_dict
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.inference import predict
from bonecomp.inference.predict import predict_submission
from bonecomp.losses import build_loss
from bonecomp.memory import BatchMemoryError, MemoryBudget
from bonecomp.models import create_model
from bonecomp.runs import ensemble_members, run_dir
from bonecomp.training import fold as training
from bonecomp.training import run_training
from bonecomp.training.batch_plan import plan_batch, probe_sizes
from bonecomp.training.data import build_loaders, fold_split, prepare_cache
from tests.test_training import tiny_config

C = 29


def attach_budget(monkeypatch, budget: MemoryBudget, module=training, name="build_state") -> None:
    """Every model ``module.name`` builds (its result's ``.model``; by default the training
    state ``run_training`` builds) runs on ``budget``'s fake device."""
    real = getattr(module, name)

    def build(*args, **kwargs):
        built = real(*args, **kwargs)
        budget.attach(built.model)
        return built

    monkeypatch.setattr(module, name, build)


@pytest.fixture(scope="module")
def baseline(tiny_root, tmp_path_factory):
    """A tiny run (2 epochs, batch 4) without any memory limit."""
    work = tmp_path_factory.mktemp("base")
    cfg = tiny_config(tiny_root, work)
    run_training(cfg, 0, progress=False)
    return cfg, run_dir(cfg, 0)


# ------------------------------------------------------------------------- training
def _batches(n_batches: int, b: int, size: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (b, size, size), dtype=torch.uint8, generator=g),
            "mask": torch.randint(0, 2, (b, C, size, size), dtype=torch.uint8, generator=g),
            "index": torch.arange(i * b, (i + 1) * b),
        }
        for i in range(n_batches)
    ]


class _Sched:
    def step_update(self, n: int) -> None:
        self.n = n


def _train(budget: MemoryBudget | None, micro: int | None = None, accum: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, C, 1))
    if budget is not None:
        budget.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = engine.StepContext(torch.device("cpu"), accum_steps=accum, progress=False)
    ctx.micro_batch = micro
    loss = build_loss(from_dict(Config, {"loss": {"terms": {"bce": 1.0}}}).loss)  # linear in images
    row = engine.train_one_epoch(model, _batches(4, 4), opt, _Sched(), loss, ctx, engine.Epoch(0))
    return row, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_an_update_out_of_memory_is_redone_in_halves_with_the_same_gradient():
    row, weights = _train(None)
    budget = MemoryBudget(total=3)  # forwards of at most 3 images
    row2, weights2 = _train(budget)
    assert budget.ooms == 1  # 4 fail once, then 2 for the rest of the epoch
    assert row["micro_batch"] == 4 and row2["micro_batch"] == 2
    assert row2["num_updates"] == row["num_updates"] == 2
    torch.testing.assert_close(weights2, weights, rtol=1e-5, atol=1e-6)
    assert row2["loss"] == pytest.approx(row["loss"], rel=1e-5)
    # a fixed micro-batch spanning the update's batches: 8 images in chunks of 3, 3, 2
    _, weights3 = _train(None, micro=3)
    torch.testing.assert_close(weights3, weights, rtol=1e-5, atol=1e-6)


def test_the_retry_is_a_switch_the_probe_turns_off():
    """train_step halves and redoes an update out of memory; with ``oom_retry`` off (the
    batch-size probe, the doctor) the error reaches the caller, which measures it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, C, 1))
    MemoryBudget(total=3).attach(model)  # forwards of at most 3 images
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = build_loss(from_dict(Config, {"loss": {"terms": {"bce": 1.0}}}).loss)
    off = engine.StepContext(torch.device("cpu"), progress=False, oom_retry=False)
    with pytest.raises(torch.OutOfMemoryError):
        engine.train_step(model, _batches(1, 4), opt, loss, off)
    assert off.micro_batch is None
    on = engine.StepContext(torch.device("cpu"), progress=False)
    out = engine.train_step(model, _batches(1, 4), opt, loss, on)
    assert on.micro_batch == 2 and out["forwards"] == 2 and out["images"] == 4


def test_one_image_out_of_memory_names_the_keys():
    with pytest.raises(BatchMemoryError, match=r"train\.micro_batch=1.*data\.image_size"):
        _train(MemoryBudget(total=0))


def test_a_run_out_of_memory_keeps_its_updates(baseline, tiny_root, tmp_path, monkeypatch):
    _, run0 = baseline
    budget = MemoryBudget(total=2)  # training batches of 4 do not fit (the 2 val images do)
    attach_budget(monkeypatch, budget)
    cfg = tiny_config(tiny_root, tmp_path)
    run_training(cfg, 0, progress=False)
    run = run_dir(cfg, 0)
    assert budget.ooms == 1  # once, then 2 images per forward for the rest of the run
    last, last0 = load_checkpoint(run.last), load_checkpoint(run0.last)
    assert last["progress"]["num_updates"] == last0["progress"]["num_updates"] == 2 * 2
    assert load_checkpoint(run.best)["metric"] >= 0
    summary, summary0 = pd.read_csv(run.summary), pd.read_csv(run0.summary)
    assert summary["micro_batch"].tolist() == [2, 2] and summary0["micro_batch"].tolist() == [4, 4]
    assert np.isfinite(summary[["loss", "val_loss", "val_dice"]].to_numpy()).all()
    # batch norm sees halves: close to, not equal to, the run without the limit
    np.testing.assert_allclose(summary["loss"], summary0["loss"], rtol=0.2)
    assert summary["lr"].tolist() == summary0["lr"].tolist()


# ---------------------------------------------------------------- validation, inference
def test_validation_out_of_memory_gives_the_same_scores(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path)
    folds, cache = prepare_cache(cfg, discover(tiny_root, "train"), Dist(), False)
    data = build_loaders(cfg, cache, *fold_split(folds, 0))
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    loss = build_loss(cfg.loss)
    ctx = engine.StepContext(torch.device("cpu"), progress=False)
    want = engine.validate(model, data.val_loader, cache, loss, ctx)
    budget = MemoryBudget(total=1)
    budget.attach(model)
    got = engine.validate(model, data.val_loader, cache, loss, ctx)
    assert budget.ooms == 1 and ctx.eval_micro_batch == 1  # the 2 images, then 1 at a time
    assert got.metrics["dice"] == want.metrics["dice"]
    assert got.table.n_images == want.table.n_images
    np.testing.assert_array_equal(got.table.per_class, want.table.per_class)
    assert got.metrics["loss"] == pytest.approx(want.metrics["loss"], rel=1e-6)


def test_inference_out_of_memory_writes_the_same_csv(baseline, tmp_path, monkeypatch):
    cfg, _ = baseline
    members = ensemble_members(cfg)
    want = predict_submission(cfg, members, tmp_path / "want.csv", progress=False).path
    budget = MemoryBudget(total=1)  # infer.batch_size 4 -> 2 -> 1
    attach_budget(monkeypatch, budget, predict, "load_member")
    got = predict_submission(cfg, members, tmp_path / "got.csv", progress=False)
    assert budget.ooms == 2 and got.report.ok
    assert got.path.read_bytes() == want.read_bytes()


# ---------------------------------------------------------------------------- auto
def test_probe_sizes_grow_to_the_batch():
    assert probe_sizes(1) == [1]
    assert probe_sizes(8) == [1, 2, 4, 8]
    assert probe_sizes(12) == [1, 2, 4, 8, 12]


def test_auto_keeps_the_largest_micro_batch_under_the_margin(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.micro_batch": "auto", "train.batch_size": 16})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, C, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ctx = engine.StepContext(torch.device("cpu"), progress=False)
    # 120 bytes per image of 1000: 8 images (960) fit but pass 85%, 16 run out of memory
    budget = MemoryBudget(total=1000, bytes_per_image=120)
    torch.manual_seed(1)
    plan = plan_batch(cfg, model, opt, ctx, budget)
    after_rng = torch.rand(3)
    assert plan.micro_batch == 4 and plan.how == "probe"
    assert plan.peak_bytes == {1: 120, 2: 240, 4: 480, 8: 960}
    assert plan.forwards_per_update == 4 and plan.effective_batch == 16
    for k, v in model.state_dict().items():  # weights and batch-norm statistics untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.manual_seed(1)
    torch.testing.assert_close(after_rng, torch.rand(3))  # the training RNG stream is intact
    assert not opt.state  # the real optimiser never stepped
    budget = MemoryBudget(total=1000, bytes_per_image=1000)  # 1 image is over the margin
    assert plan_batch(cfg, model, opt, ctx, budget).micro_batch == 1
    with pytest.raises(BatchMemoryError, match=r"data\.image_size"):
        plan_batch(cfg, model, opt, ctx, MemoryBudget(total=0))
    cfg.train.micro_batch = 0  # refused with the config, before any model is built
    with pytest.raises(ConfigError, match=r"train\.micro_batch"):
        check_config(cfg)


def test_memory_fraction_is_the_margin_the_probe_keeps(tiny_root, tmp_path):
    """120 bytes per image of 1000: 8 images (960 bytes) fit under 0.99 of the device,
    only 4 (480) under 0.5 and only 2 (240) under 0.3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, C, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ctx = engine.StepContext(torch.device("cpu"), progress=False)
    for fraction, micro in ((0.99, 8), (0.5, 4), (0.3, 2)):
        keys = {"train.micro_batch": "auto", "train.batch_size": 16,
                "train.memory_fraction": fraction}  # fmt: skip
        cfg = tiny_config(tiny_root, tmp_path, **keys)
        plan = plan_batch(cfg, model, opt, ctx, MemoryBudget(total=1000, bytes_per_image=120))
        assert plan.micro_batch == micro, fraction


def test_the_probe_gives_the_loss_the_keys_the_dataset_yields(tiny_root, tmp_path, registries):
    """The probe's batches repeat a real training item: a term reading a key the dataset
    adds gets it (a random image/mask batch would raise KeyError)."""
    from bonecomp import losses

    seen = []

    def weighted(cfg):
        def term(logits, batch):
            seen.append(tuple(batch["weight"].shape))
            return (logits.float().sigmoid() * batch["weight"][:, None, None, None]).mean()

        return term

    losses.register_loss("probe_weighted", weighted)
    cfg = tiny_config(tiny_root, tmp_path, **{"train.micro_batch": "auto", "train.batch_size": 4})
    cfg.loss.terms = {"probe_weighted": 1.0}
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, C, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ctx = engine.StepContext(torch.device("cpu"), progress=False, soft_targets=True)
    size = cfg.data.image_size
    item = {"image": torch.zeros(size, size, dtype=torch.uint8),
            "mask": torch.zeros(C, size, size, dtype=torch.uint8),
            "index": 0, "weight": torch.tensor(2.0)}  # fmt: skip
    budget = MemoryBudget(total=1000, bytes_per_image=100)
    plan = plan_batch(cfg, model, opt, ctx, budget, build_loss(cfg.loss), sample=lambda: item)
    assert plan.how == "probe" and seen == [(1,), (2,), (4,)]


def test_auto_in_a_run_writes_the_plan_and_trains_with_it(tiny_root, tmp_path, monkeypatch):
    budget = MemoryBudget(total=300, bytes_per_image=100)  # 2 images fit under 85%
    monkeypatch.setattr(training, "device_meter", lambda device: budget)
    cfg = tiny_config(tiny_root, tmp_path, **{"train.micro_batch": "auto", "train.epochs": 1})
    run_training(cfg, 0, progress=False)
    run = run_dir(cfg, 0)
    plan = json.loads(run.batch_plan.read_text())
    assert plan["micro_batch"] == 2 and plan["how"] == "probe"
    assert plan["peak_bytes"] == {"1": 100, "2": 200, "4": None}
    assert plan["forwards_per_update"] == 2 and plan["effective_batch"] == 4
    assert pd.read_csv(run.summary)["micro_batch"].tolist() == [2]
    assert load_checkpoint(run.last)["progress"]["num_updates"] == 2


def test_auto_on_cpu_uses_the_full_batch_and_says_so(tiny_root, tmp_path, capsys):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.micro_batch": "auto", "train.epochs": 1})
    run_training(cfg, 0, progress=False)
    plan = json.loads(run_dir(cfg, 0).batch_plan.read_text())
    assert plan["micro_batch"] == 4 and plan["how"] == "cpu" and plan["peak_bytes"] == {}
    assert "train.micro_batch=auto on CPU: no probe" in capsys.readouterr().out


# ------------------------------------------------------------------------- compile
def test_a_compiled_run_saves_plain_checkpoints(tiny_root, tmp_path, monkeypatch):
    compiled = []
    real = torch.compile
    # dynamo's eager backend: the same wrapper (whose "_orig_mod." keys the checkpoints must
    # not show) without inductor's code generation, a minute of CPU when its cache is cold
    eager = {"backend": "eager"}
    monkeypatch.setattr(
        torch, "compile", lambda m, **kw: compiled.append(m) or real(m, **kw, **eager)
    )
    cfg = tiny_config(
        tiny_root, tmp_path,
        **{"train.compile": True, "train.epochs": 1, "data.image_size": 32, "data.exclude": []},
    )  # fmt: skip
    t0 = time.monotonic()
    run_training(cfg, 0, progress=False)
    print(f"compiled run: {time.monotonic() - t0:.1f} s")
    assert len(compiled) == 1
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run_dir(cfg, 0).path / name)["model"]
        assert not any(k.startswith("_orig_mod.") for k in state)
        create_model(cfg.model).load_state_dict(state, strict=True)
