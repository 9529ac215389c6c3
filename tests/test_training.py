"""Training runs on the tiny phantom: the run directory, resume, failures (torchrun:
test_distributed.py)."""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bonecomp import engine, metrics
from bonecomp.checkpoint import load_checkpoint
from bonecomp.config import load_config
from bonecomp.data.dataset import BoneDataset
from bonecomp.losses import WeightedLoss, register_loss
from bonecomp.metrics import register_metric
from bonecomp.runs import RunDir, RunError
from bonecomp.testing import tiny_config, tiny_overrides
from bonecomp.training import data as training_data
from bonecomp.training import fold as training
from bonecomp.training import run_training

ROOT = Path(__file__).resolve().parents[1]


def test_two_epochs_write_the_whole_run_dir(tiny_root, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--fold", "1", "--quiet"]
    # two DataLoader workers: the data path must survive forked workers
    assert (
        train_script.main(args + tiny_overrides(tiny_root, tmp_path, **{"data.num_workers": 2}))
        == 0
    )
    run = tmp_path / "runs" / "tiny" / "fold1"
    for name in [
        "config.yaml",
        "summary.csv",
        "dice_per_class.csv",
        "dice_per_class.png",
        "best.pt",
        "last.pt",
        "oof.npy",
        "oof_index.csv",
    ]:
        assert (run / name).is_file(), name
    summary = pd.read_csv(run / "summary.csv")
    assert summary["epoch"].tolist() == [0, 1]
    assert {"loss", "val_dice", "lr", "img_s", "elapsed"} <= set(summary.columns)
    assert summary["val_dice"].between(0, 1).all()
    best = load_checkpoint(run / "best.pt")
    assert best["fold"] == 1 and best["input_size"] == 64 and len(best["per_class"]) == 29
    assert best["config"]["model"]["arch"] == "unet"
    assert "optimizer" not in best
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and {"optimizer", "scheduler", "rng"} <= set(last)
    oof = np.load(run / "oof.npy")
    index = pd.read_csv(run / "oof_index.csv")
    assert oof.dtype == np.float16 and oof.shape == (len(index), 29, 32, 32)
    assert oof.min() >= 0 and oof.max() <= 1
    assert load_config(run / "config.yaml").data.image_size == 64


def test_resume_after_interruption_continues_from_the_right_epoch(tiny_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.epochs": 3})
    real = engine.train_one_epoch
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(kwargs.get("epoch", args[6]).index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like kill -9 mid-epoch: last.pt is from epoch 1
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, 0, progress=False)
    run = tmp_path / "runs" / "tiny" / "fold0"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    with pytest.raises(RunError, match="--resume"):
        run_training(cfg, 0, progress=False)
    monkeypatch.setattr(training, "train_one_epoch", real)
    changed = tiny_config(tiny_root, tmp_path, **{"train.epochs": 5})
    with pytest.raises(RunError, match=r"train\.epochs: 3 -> 5"):
        run_training(changed, 0, resume=True, progress=False)  # would keep the old schedule
    resumed = []
    monkeypatch.setattr(
        training, "train_one_epoch", lambda *a, **k: resumed.append(a[6].index) or real(*a, **k)
    )
    result = run_training(cfg, 0, resume=True, progress=False)
    assert resumed == [2] and result.epochs_done == 3
    assert pd.read_csv(run / "summary.csv")["epoch"].tolist() == [0, 1, 2]
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["progress"]["num_updates"] == 3 * 2  # 8 images / batch 4


def test_non_finite_loss_stops_naming_the_images(tiny_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.epochs": 2})
    real_loss = WeightedLoss.forward
    epochs_seen = []

    def nan_in_second_epoch(self, logits, target):
        loss, parts = real_loss(self, logits, target)
        if self.training and epochs_seen and len(epochs_seen) > 2:
            return loss * float("nan"), parts
        epochs_seen.append(1)
        return loss, parts

    monkeypatch.setattr(WeightedLoss, "forward", nan_in_second_epoch)
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch \d+, batch \d+; images: \['ID"):
        run_training(cfg, 0, progress=False)
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "fold0" / "last.pt")
    assert torch.isfinite(torch.cat([v.flatten().float() for v in last["model"].values()])).all()


def test_default_config_without_data_says_where_it_looked(tmp_path, capsys):
    """`python scripts/train.py --fold 0` runs the competition recipe on data/competition;
    without data it says where it looked and how to run the demo, even when a run folder
    of that recipe exists (data problems come before run-folder problems)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    stale = tmp_path / "runs" / "unetpp_effb4_1024" / "fold0"
    stale.mkdir(parents=True)
    (stale / "last.pt").write_bytes(b"")
    code = train_script.main(["--fold", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "data" / "competition") in err
    assert "configs/demo.yaml" in err and "make demo" in err and "already holds" not in err


def test_bad_fold_is_one_line(tiny_root, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--fold", "7", "--quiet"]
    assert train_script.main(args + tiny_overrides(tiny_root, tmp_path)) == 2
    assert "--fold '7'" in capsys.readouterr().err


def test_a_fold_in_training_is_not_started_twice(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path)
    run = RunDir(tmp_path / "runs" / "tiny" / "fold0")
    with run.lock(), pytest.raises(RunError, match=f"being trained by pid {os.getpid()}"):
        run_training(cfg, 0, progress=False)
    assert not run.last.exists() and not run.summary.exists()


@pytest.mark.parametrize("second", ["worse", "fails"])
def test_a_run_leaves_no_lock_or_staged_file(tiny_root, tmp_path, monkeypatch, second):
    """The second validation's OOF is staged and then not the run's (its Dice is worse,
    or training fails right after it): neither it nor the run's lock file stays."""
    real, calls = training.validate, []

    def validate(*args, **kwargs):
        val = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2 and second == "fails":
            raise RuntimeError("stop")
        val.metrics["dice"] = 0.5 if len(calls) == 1 else 0.1
        return val

    monkeypatch.setattr(training, "validate", validate)
    cfg = tiny_config(tiny_root, tmp_path)
    run = tmp_path / "runs" / "tiny" / "fold0"
    with pytest.raises(RuntimeError, match="stop") if second == "fails" else nullcontext():
        run_training(cfg, 0, progress=False)
    assert len(calls) == 2
    assert (run / "oof.npy").is_file() and load_checkpoint(run / "best.pt")["epoch"] == 0
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_resume_keeps_a_better_best_and_works_after_the_folder_moved(
    tiny_root, tmp_path, monkeypatch
):
    cfg = tiny_config(tiny_root, tmp_path, **{"train.epochs": 3})
    real, calls = engine.train_one_epoch, []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, 0, progress=False)
    monkeypatch.setattr(training, "train_one_epoch", real)
    # The folder is moved: paths that only say where the run lives do not block a resume.
    moved = tmp_path / "elsewhere"
    (tmp_path / "runs").rename(moved)
    # best.pt is better than anything last.pt knows of (as when a kill hit last.pt's save).
    best_path = moved / "tiny" / "fold0" / "best.pt"
    best = torch.load(best_path, weights_only=True)
    best["metric"] = 2.0
    torch.save(best, best_path)
    cfg.train.output_dir = str(moved)
    result = run_training(cfg, 0, resume=True, progress=False)
    assert result.epochs_done == 3 and result.best_dice == 2.0
    assert load_checkpoint(best_path)["metric"] == 2.0  # not replaced by a worse epoch


class WeightedItems(BoneDataset):
    """A dataset that adds a key the library never names: a per-pixel loss weight."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["weight"] = torch.full((1, *item["image"].shape[-2:]), 1.0 + item["index"] % 3)
        return item


def test_a_term_a_metric_and_a_dataset_key_from_user_code_reach_summary_csv(
    tiny_root, tmp_path, monkeypatch, registries
):
    """Registered outside the package, with no other edit: the config check accepts the
    term, training and validation hand it the dataset's extra key, and summary.csv logs
    it as loss_<name> and the metric as val_<name>."""
    monkeypatch.setattr(training_data, "BoneDataset", WeightedItems)
    weights_seen = set()

    @register_loss("weighted_bce")
    def weighted_bce(cfg):
        def term(logits, batch):
            weights_seen.update(batch["weight"].unique().tolist())
            return F.binary_cross_entropy_with_logits(logits, batch["mask"], batch["weight"])

        return term

    @register_metric("worst_dice")
    def worst_dice(scores: metrics.Scores) -> float:
        return float(scores.table.per_class.min())

    cfg = tiny_config(tiny_root, tmp_path, **{"loss.terms": {"dice": 0.5, "weighted_bce": 0.5}})
    run_training(cfg, 0, progress=False)
    summary = pd.read_csv(tmp_path / "runs" / "tiny" / "fold0" / "summary.csv")
    assert {"loss_dice", "loss_weighted_bce", "val_loss", "val_dice", "val_worst_dice"} <= set(
        summary.columns
    )
    assert summary["loss_weighted_bce"].gt(0).all() and weights_seen <= {1.0, 2.0, 3.0}
    assert len(weights_seen) > 1
    assert (summary["val_worst_dice"] <= summary["val_dice"]).all()
    assert summary["val_worst_dice"].between(0, 1).all()


def test_a_run_cut_by_its_time_budget_is_annealed_and_says_so(tiny_root, tmp_path, capsys):
    """A budget far shorter than one epoch: training stops after epoch 0 of 6 with the lr
    at the schedule's floor (train.min_lr), validates, and summary.csv, the console, the
    warning below train.expect_dice and the report all say it was cut."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    from bonecomp.report import write_run_report

    extra = {
        "train.max_train_minutes": 1e-4, "train.epochs": 6, "train.min_lr": 1e-5,
        "train.expect_dice": 0.99, "train.report": False,
    }  # fmt: skip
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--fold", "0", "--quiet"]
    assert train_script.main(args + tiny_overrides(tiny_root, tmp_path, **extra)) == 0
    run = tmp_path / "runs" / "tiny" / "fold0"
    summary = pd.read_csv(run / "summary.csv")
    assert summary["epoch"].tolist() == [0]
    assert summary["lr"].iloc[-1] == pytest.approx(1e-5)
    assert summary["schedule"].iloc[-1] == pytest.approx(1.0)
    assert summary["val_dice"].notna().iloc[-1]
    note = "cut by train.max_train_minutes=0.0001 after 1 of 6 epochs"
    assert summary["stop"].iloc[-1] == note
    out = capsys.readouterr()
    assert note in out.out
    warning = [line for line in out.err.splitlines() if line.startswith("warning: fold 0")]
    assert len(warning) == 1 and "train.max_train_minutes=null" in warning[0]
    assert "train.expect_dice" in warning[0]
    page = write_run_report(tmp_path / "runs" / "tiny").read_text()
    assert f"fold 0 was {note}" in page


def test_an_unreached_budget_changes_nothing_even_after_a_slow_start(
    tiny_root, tmp_path, monkeypatch
):
    """Two real trainings with DataLoader workers, one with a 10-minute budget and one
    without, whose start-up takes 200 s on the budget's clock (workers, a cold cache,
    compilation: the clock jumps when the first sample is made, in whichever worker): the
    finish projected from the pace after the first update stays far inside the budget,
    so both end with identical weights and epochs, and the schedule column is the update
    count's share. The old rule (elapsed share of the budget x the 24 planned updates) put
    the schedule at 8 after the first update. The clock's jump stands for the slow start
    so that the test does not depend on how fast the machine runs the rest."""
    real_getitem = BoneDataset.__getitem__

    def first_sample_marks(self, i):
        Path(os.environ["SLOW_START_MARKER"]).touch()
        return real_getitem(self, i)

    def budget_clock() -> float:
        started = Path(os.environ["SLOW_START_MARKER"]).exists()
        return time.monotonic() + (200.0 if started else 0.0)

    monkeypatch.setattr(BoneDataset, "__getitem__", first_sample_marks)
    monkeypatch.setattr(training, "Budget", functools.partial(engine.Budget, clock=budget_clock))
    weights = {}
    for name, minutes in (("plain", None), ("budget", 10.0)):
        monkeypatch.setenv("SLOW_START_MARKER", str(tmp_path / f"{name}.started"))
        cfg = tiny_config(tiny_root, tmp_path / name, **{
            "train.max_train_minutes": minutes, "train.epochs": 3, "train.batch_size": 1,
            "data.num_workers": 2, "train.report": False,
        })  # fmt: skip
        result = run_training(cfg, 0, progress=False)
        assert (tmp_path / f"{name}.started").exists()  # the samples came from the workers
        summary = pd.read_csv(result.run_dir / "summary.csv")
        assert summary["epoch"].tolist() == [0, 1, 2] and result.cut == ""
        weights[name] = load_checkpoint(result.run_dir / "last.pt")["model"]
    assert "stop" not in summary and "clock_from" not in summary
    assert summary["schedule"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert weights["plain"].keys() == weights["budget"].keys()
    for k, v in weights["plain"].items():
        assert torch.equal(v, weights["budget"][k]), k
