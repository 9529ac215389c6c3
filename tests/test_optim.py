"""Optimizers and schedules from timm's factories; the defaults keep the old schedule."""

from __future__ import annotations

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from bonecomp.config import SCHEDULERS, ConfigError, TrainConfig
from bonecomp.optim import build_optimizer, build_scheduler

# The names train.optimizer documents in configs/base.yaml (any timm name is accepted).
OPTIMIZERS = ["adamw", "adam", "sgd", "momentum", "lion", "lamb", "radam", "rmsprop"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def _train_steps(model, optimizer, scheduler, epochs: int, per_epoch: int) -> list[float]:
    """Run the trainer's contract; return the lr used by each update."""
    lrs, updates = [], 0
    for epoch in range(epochs):
        for _ in range(per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            model(torch.randn(2, 3, 8, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            updates += 1
            scheduler.step_update(updates)
        scheduler.step(epoch + 1, metric=0.5)
    return lrs


def test_default_optimizer_is_the_old_adamw():
    cfg = TrainConfig()
    model = _model()
    opt = build_optimizer(model, cfg)
    old = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    assert type(opt) is torch.optim.AdamW
    (group,), (old_group,) = opt.param_groups, old.param_groups
    assert {k: v for k, v in group.items() if k != "params"} == {
        k: v for k, v in old_group.items() if k != "params"
    }
    assert len(group["params"]) == len(list(model.parameters()))  # biases and norms decay too


@pytest.mark.parametrize("epochs, per_epoch, warmup", [(40, 7, 1.0), (24, 3, 0.5), (3, 1, 0.0)])
def test_default_schedule_gives_the_old_learning_rates(epochs, per_epoch, warmup):
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup, lr=3e-3)
    new_opt = build_optimizer(_model(), cfg)
    new = build_scheduler(new_opt, cfg, per_epoch)
    old_opt = torch.optim.AdamW(_model().parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    old = CosineLRScheduler(  # as bonecomp/training.py built it before the config key
        old_opt,
        t_initial=max(cfg.epochs * per_epoch, 1),
        lr_min=cfg.lr * 0.01,
        warmup_t=int(cfg.warmup_epochs * per_epoch),
        warmup_lr_init=cfg.lr * 0.01,
        t_in_epochs=False,
    )
    want = [old_opt.param_groups[0]["lr"]]
    got = [new_opt.param_groups[0]["lr"]]
    for n in range(1, epochs * per_epoch + 1):
        old.step_update(n)
        new.step_update(n)
        if n % per_epoch == 0:
            old.step(n // per_epoch)
            new.step(n // per_epoch, metric=None)
        want.append(old_opt.param_groups[0]["lr"])
        got.append(new_opt.param_groups[0]["lr"])
    assert got == want
    assert len(set(got)) > 2  # the schedule moves


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_documented_optimizer_builds_and_steps(name):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2))
    _train_steps(model, opt, build_scheduler(opt, TrainConfig(optimizer=name), 2), 1, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_momentum_reaches_sgd():
    opt = build_optimizer(_model(), TrainConfig(optimizer="sgd", momentum=0.8))
    assert opt.param_groups[0]["momentum"] == 0.8


def test_sgd_without_momentum_is_plain_sgd():
    """timm's sgd is Nesterov, which torch refuses without momentum; momentum 0 (in the
    key's range) gives plain SGD: one step moves a weight by lr x its gradient."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    opt = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0,
                                             lr=0.1))  # fmt: skip
    model(torch.tensor([[3.0, 4.0]])).sum().backward()  # gradient (3, 4)
    opt.step()
    torch.testing.assert_close(model.weight, torch.tensor([[1.0 - 0.3, 2.0 - 0.4]]))


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.optimizer.*'adamx'.*valid.*adamw"):
        build_optimizer(_model(), TrainConfig(optimizer="adamx"))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_builds_steps_and_saves_its_state(name):
    cfg = TrainConfig(scheduler=name, epochs=6, warmup_epochs=1.0, decay_epochs=2)
    model = _model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 4)
    lrs = _train_steps(model, opt, sched, cfg.epochs, 4)
    assert all(0 < lr <= cfg.lr for lr in lrs)
    if name == "none":
        assert set(lrs) == {cfg.lr}
    else:
        assert lrs[0] == pytest.approx(cfg.lr * 0.01)  # warm-up from min_lr, per update
        assert lrs[0] < lrs[1] < lrs[2] < lrs[3] and max(lrs) > 0.8 * cfg.lr
    sched.load_state_dict(sched.state_dict())


def test_schedules_decay():
    ends = {}
    for name in ("cosine", "poly", "step"):
        cfg = TrainConfig(scheduler=name, epochs=6, warmup_epochs=0, decay_epochs=2)
        opt = build_optimizer(_model(), cfg)
        sched = build_scheduler(opt, cfg, 4)
        for n in range(1, 6 * 4):
            sched.step_update(n)
        ends[name] = opt.param_groups[0]["lr"]
    assert ends["cosine"] < 0.05 * 1e-3 and ends["poly"] < 0.2 * 1e-3
    assert ends["step"] == pytest.approx(1e-3 * 0.1**2)  # decays after 8 and 16 updates


def test_min_lr_is_the_floor_and_the_warmup_start():
    cfg = TrainConfig(epochs=2, warmup_epochs=1.0, min_lr=1e-5)
    opt = build_optimizer(_model(), cfg)
    sched = build_scheduler(opt, cfg, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    sched.step_update(6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_plateau_decays_after_patience_and_resumes():
    cfg = TrainConfig(scheduler="plateau", warmup_epochs=0, patience_epochs=1, decay_rate=0.5)
    opt = build_optimizer(_model(), cfg)
    sched = build_scheduler(opt, cfg, 2)
    for epoch, dice in enumerate([0.5, 0.6, 0.6, 0.6]):  # two validations without a gain
        sched.step_update(2 * (epoch + 1))
        sched.step(epoch + 1, metric=dice)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5)
    sched.step(5, metric=0.6)  # one more without a gain; then the run is killed
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2 = build_optimizer(_model(), cfg)
    opt2.load_state_dict(opt_state)
    resumed = build_scheduler(opt2, cfg, 2)
    resumed.load_state_dict(state)
    resumed.step(6, metric=None)  # an epoch without validation does not count
    assert opt2.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5)
    resumed.step(7, metric=0.6)  # the resumed scheduler remembers the plateau
    assert opt2.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.25)
