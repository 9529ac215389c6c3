"""The epoch loop's extras (``bonecomp.training.hooks``): each hook alone on a fake fold
run, and the loop of a real run calling an extra hook at every point of every epoch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonecomp.checkpoint import load_checkpoint
from bonecomp.classes import NUM_CLASSES
from bonecomp.config import AverageConfig, Config
from bonecomp.distributed import Dist
from bonecomp.engine import Validation
from bonecomp.metrics import DiceTable
from bonecomp.runs import RunDir
from bonecomp.testing import tiny_config
from bonecomp.training import run_training
from bonecomp.training.average import Averager
from bonecomp.training.hooks import (
    AveragingHook,
    CheckpointHook,
    EpochHook,
    EpochRecord,
    OOFHook,
    TrackingHook,
)
from bonecomp.training.records import SummaryLog
from bonecomp.training.state import Progress


def _fold_run(tmp_path, **extra) -> SimpleNamespace:
    """What a hook reads of a ``FoldRun``: a single-process run of ``Config()`` with a
    one-layer model."""
    model = nn.Linear(3, 2)
    state = SimpleNamespace(
        model=model, eval_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=SimpleNamespace(state_dict=lambda: {"t": 1}), scaler=None, ema=None,
        average=None,
    )  # fmt: skip
    run = RunDir(tmp_path / "runs" / "x" / "fold0")
    run.path.mkdir(parents=True)
    return SimpleNamespace(cfg=Config(), fold=0, run=run, state=state, dd=Dist(), **extra)


def _validation(dice: float) -> Validation:
    table = DiceTable(np.full(NUM_CLASSES, dice), n_images=2)
    return Validation({"loss": 0.3, "dice": dice}, table)


def test_the_tracking_hook_logs_each_epochs_row_to_summary_and_trackers(tmp_path):
    f = _fold_run(tmp_path)
    log = SummaryLog(f.cfg, f.run)
    sent = []
    log.trackers = SimpleNamespace(log=lambda values, step: sent.append((step, values)))
    hook = TrackingHook(log)
    for epoch in (0, 1):
        row = {"epoch": epoch, "loss": 1.0 - epoch / 4, "val_dice": 0.5, "elapsed": 2.0}
        hook.on_epoch_end(f, Progress(epoch=epoch), EpochRecord(epoch, row))
    summary = pd.read_csv(f.run.summary)
    assert summary["epoch"].tolist() == [0, 1] and summary["loss"].tolist() == [1.0, 0.75]
    assert [s for s, _ in sent] == [0, 1]
    assert sent[1][1] == {"loss": 0.75, "val_dice": 0.5, "elapsed": 2.0}


def test_the_checkpoint_hook_writes_best_pt_on_a_best_and_last_pt_every_epoch(tmp_path):
    f = _fold_run(tmp_path)
    hook = CheckpointHook()
    record = EpochRecord(3, val=_validation(0.6), improved=True)
    hook.on_best(f, Progress(), record)
    best = load_checkpoint(f.run.best)
    assert best["epoch"] == 3 and best["metric"] == 0.6 and "optimizer" not in best
    assert torch.equal(best["model"]["weight"], f.state.model.weight)
    assert pd.read_csv(f.run.dice_csv)["dice"].tolist() == [0.6] * NUM_CLASSES
    assert not f.run.last.exists()  # only at the epoch's end
    hook.on_epoch_end(f, Progress(epoch=3, num_updates=12, best_dice=0.6, best_epoch=3), record)
    last = load_checkpoint(f.run.last)
    assert last["epoch"] == 3 and last["progress"]["num_updates"] == 12
    assert last["scheduler"] == {"t": 1} and "optimizer" in last and "rng" in last


def test_the_oof_hook_stages_each_validation_and_commits_only_a_best(tmp_path):
    cache = SimpleNamespace(index=pd.DataFrame({"id": ["a", "b", "c", "d"]}))
    f = _fold_run(tmp_path, data=SimpleNamespace(cache=cache, val_idx=np.array([1, 3])))
    f.cfg.train.oof_size = 4
    hook = OOFHook()

    def validation(epoch: int, value: float, improved: bool) -> None:
        record = EpochRecord(epoch)
        hook.before_validation(f, Progress(), record)
        assert record.oof is not None  # what validation writes its maps to
        for i in (1, 3):
            record.oof.write(i, torch.full((NUM_CLASSES, 8, 8), value))
        record.val, record.improved = _validation(value), improved
        hook.after_validation(f, Progress(), record)
        if improved:
            hook.on_best(f, Progress(), record)

    validation(0, 0.25, improved=True)
    assert np.load(f.run.oof).shape == (2, NUM_CLASSES, 4, 4)
    assert np.all(np.load(f.run.oof) == np.float16(0.25))
    index = pd.read_csv(f.run.oof_index)
    assert index["id"].tolist() == ["b", "d"] and set(index["epoch"]) == {0}
    validation(1, 0.75, improved=False)  # staged, never the run's
    assert np.all(np.load(f.run.oof) == np.float16(0.25))
    assert set(pd.read_csv(f.run.oof_index)["epoch"]) == {0}


def test_the_averaging_hook_keeps_the_chosen_epochs_in_the_pool(tmp_path):
    """last 2 of 3 epochs and the best validation: epochs 0 (best), 1 and 2 are pooled;
    a pool file leaves only at an epoch's end (after last.pt)."""
    f = _fold_run(tmp_path)
    averager = Averager(AverageConfig(last=2, best=1), epochs=3)
    hook = AveragingHook(averager)
    weights = {}
    for epoch, dice in enumerate([0.5, 0.2, 0.4]):
        with torch.no_grad():
            f.state.eval_model.weight.fill_(epoch)
        weights[epoch] = f.state.eval_model.weight.clone()
        record = EpochRecord(epoch, val=_validation(dice))
        hook.after_train_pass(f, Progress(), record)
        hook.after_validation(f, Progress(), record)
        hook.on_epoch_end(f, Progress(epoch=epoch), record)
    assert averager.epochs_chosen() == [0, 1, 2] and averager.last_epochs == [1, 2]
    assert [p.name for p in f.run.pool_files()] == [f"epoch{e:04d}.pt" for e in (0, 1, 2)]
    for epoch in (0, 1, 2):
        pooled = torch.load(f.run.pooled(epoch), weights_only=True)["model"]["weight"]
        assert torch.equal(pooled, weights[epoch])
    # a better validation replaces epoch 0, whose file goes at the end of the epoch
    record = EpochRecord(3, val=_validation(0.9))
    hook.after_validation(f, Progress(), record)
    assert f.run.pooled(0).is_file()  # last.pt still names it
    hook.on_epoch_end(f, Progress(epoch=3), record)
    assert not f.run.pooled(0).exists() and f.run.pooled(3).is_file()


class Recorder(EpochHook):
    """An extra hook: what the loop called, when, and what the record held."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def after_train_pass(self, f, prog, record):
        self.calls.append(("after_train_pass", record.epoch, "loss" in record.row))

    def before_validation(self, f, prog, record):
        self.calls.append(("before_validation", record.epoch, record.oof is not None))

    def after_validation(self, f, prog, record):
        self.calls.append(("after_validation", record.epoch, record.val is not None))

    def on_best(self, f, prog, record):
        self.calls.append(("on_best", record.epoch, prog.best_epoch == record.epoch))

    def on_epoch_end(self, f, prog, record):
        last = load_checkpoint(f.run.last)["epoch"]  # the run's own hooks came first
        self.calls.append(("on_epoch_end", record.epoch, last == prog.epoch == record.epoch))
        self.rows = [*getattr(self, "rows", []), record.row]

    def on_train_end(self, f, prog):
        self.calls.append(("on_train_end", prog.epoch, f.run.averaged.is_file()))


def test_the_loop_calls_an_extra_hook_at_every_point_of_every_epoch(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.epochs": 3, "train.average.last": 1})
    extra = Recorder()
    result = run_training(cfg, 0, progress=False, hooks=[extra])
    summary = pd.read_csv(result.run_dir / "summary.csv")
    dice = summary["val_dice"].tolist()
    want = []
    for epoch in range(3):
        want += [
            ("after_train_pass", epoch, True), ("before_validation", epoch, True),
            ("after_validation", epoch, True),
        ]  # fmt: skip
        if dice[epoch] > max(dice[:epoch], default=-1.0):  # a new best.pt
            want.append(("on_best", epoch, True))
        want.append(("on_epoch_end", epoch, True))
    want.append(("on_train_end", 2, True))
    assert extra.calls == want
    assert ("on_best", result.best_epoch, True) in extra.calls
    assert [r["epoch"] for r in extra.rows] == summary["epoch"].tolist() == [0, 1, 2]
    assert [r["val_dice"] for r in extra.rows] == summary["val_dice"].tolist()
