"""Checkpoint averaging (``train.average``): averaged.pt is the mean of the chosen epochs'
weights (computed here from copies of every epoch's last.pt), its BatchNorm statistics
are recomputed on the training batches, it survives a resume, an ensemble member loads it,
and a request the run cannot satisfy is one line before any work."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from bonecomp.checkpoint import load_checkpoint
from bonecomp.classes import CLASSES
from bonecomp.config import AverageConfig, ConfigError
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.engine import to_device
from bonecomp.inference.ensemble import load_member
from bonecomp.models import create_model
from bonecomp.runs import RunDir, RunError, ensemble_members
from bonecomp.testing import DEMO_CONFIG, tiny_config, tiny_overrides
from bonecomp.training import fold as training
from bonecomp.training import hooks, run_training
from bonecomp.training.average import Averager
from bonecomp.training.data import build_loaders, fold_split, prepare_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train as train_script

NO_AUGMENT = {"data.augment": []}  # the training batches are the cache's images
SCORES = [0.5, 0.1, 0.3, 0.2]  # the val Dice each epoch is told it reached: best 2 = {0, 2}


def _copying_save_last(copies: Path):
    """``save_last`` that also keeps a copy of each epoch's last.pt (its model is the
    epoch's weights: no EMA in these runs)."""
    real = hooks.save_last

    def save(run, cfg, fold, state, progress):
        real(run, cfg, fold, state, progress)
        shutil.copy(run.last, copies / f"epoch{progress.epoch}.pt")

    return save


def _mean_of(copies: Path, epochs: list[int]) -> dict[str, torch.Tensor]:
    states = [load_checkpoint(copies / f"epoch{e}.pt")["model"] for e in epochs]
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


def _parameter_names(cfg) -> list[str]:
    return [n for n, _ in create_model(cfg.model).named_parameters()]


@pytest.fixture(scope="module")
def averaged_run(tiny_root, tmp_path_factory):
    """4 epochs with train.average {last: 1, best: 2}; the val Dice of epochs 0..3 is
    scripted as SCORES so that the 2 best (0, 2) are not the last epoch (3)."""
    work = tmp_path_factory.mktemp("avg")
    copies = work / "copies"
    copies.mkdir()
    extra = {"train.epochs": 4, "train.average": {"last": 1, "best": 2}, **NO_AUGMENT}
    cfg = tiny_config(tiny_root, work, **extra)
    real_validate = training.validate
    told = iter(SCORES)

    def scripted(*args, **kwargs):
        val = real_validate(*args, **kwargs)
        score = next(told, None)  # the averaged model's validation (the 5th) is real
        if score is not None:
            val.metrics["dice"] = score
        return val

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "validate", scripted)
        mp.setattr(hooks, "save_last", _copying_save_last(copies))
        result = run_training(cfg, 0, progress=False)
    return SimpleNamespace(cfg=cfg, run=RunDir(result.run_dir), copies=copies, result=result)


def test_averaged_weights_are_the_mean_of_the_last_and_best_epochs(averaged_run):
    r = averaged_run
    want = sorted({3} | {0, 2})  # last 1 of 4 epochs; the two best of SCORES
    ckpt = load_checkpoint(r.run.averaged)
    assert ckpt["averaged"]["epochs"] == want
    mean = _mean_of(r.copies, want)
    names = _parameter_names(r.cfg)
    for name in names:
        torch.testing.assert_close(ckpt["model"][name].double(), mean[name], atol=1e-6, rtol=1e-5)
    # and it is not simply one of them, nor the mean of all four epochs
    everything = _mean_of(r.copies, [0, 1, 2, 3])
    assert any(not torch.allclose(ckpt["model"][n].double(), everything[n]) for n in names)
    # the pool kept exactly the chosen epochs' weights, nothing else
    assert [p.name for p in r.run.pool_files()] == [f"epoch{e:04d}.pt" for e in want]


def test_batchnorm_statistics_are_recomputed_on_the_training_batches(averaged_run, tiny_root):
    r = averaged_run
    weights = load_checkpoint(r.run.averaged)["model"]
    chosen = load_checkpoint(r.run.averaged)["averaged"]["epochs"]
    mean = _mean_of(r.copies, chosen)
    key = "net.encoder.model.conv1.1.running_mean"  # test_resnet's stem: conv, BN, ...
    assert not torch.allclose(weights[key].double(), mean[key], atol=1e-4)
    for e in chosen:
        own = load_checkpoint(r.copies / f"epoch{e}.pt")["model"][key]
        assert not torch.allclose(weights[key], own, atol=1e-4)
    # independently: the first BatchNorm's running mean is the mean of its conv's output over
    # the fold's 8 training images (2 equal batches of 4, no augmentation)
    cfg = r.cfg
    folds, cache = prepare_cache(cfg, discover(tiny_root, "train"), Dist(), False)
    train_idx, val_idx = fold_split(folds, 0)
    data = build_loaders(cfg, cache, train_idx, val_idx)
    ctx = SimpleNamespace(device=torch.device("cpu"), channels_last=False, soft_targets=True)
    x = torch.cat([to_device(b, ctx)["image"] for b in data.train_loader])
    assert len(x) == 8
    model = create_model(cfg.model)
    model.load_state_dict(weights)
    with torch.no_grad():
        stem = model.net.encoder.model.conv1[0]
        expected = stem((x - model.mean) / model.std).mean(dim=(0, 2, 3))
    torch.testing.assert_close(weights[key], expected, atol=1e-4, rtol=1e-4)
    assert int(weights[key.replace("running_mean", "num_batches_tracked")]) == 2


def test_averaged_pt_is_scored_and_self_describing(averaged_run):
    r = averaged_run
    ckpt = load_checkpoint(r.run.averaged)
    assert ckpt["fold"] == 0 and ckpt["input_size"] == 64 and ckpt["classes"] == list(CLASSES)
    assert ckpt["config"]["train"]["average"] == {"last": 1, "best": 2}
    assert ckpt["epoch"] == 3 and len(ckpt["per_class"]) == len(CLASSES)
    table = pd.read_csv(r.run.averaged_dice_csv)
    assert table["dice"].tolist() == pytest.approx(ckpt["per_class"])
    assert r.result.averaged_dice == pytest.approx(ckpt["metric"])
    assert ckpt["metric"] not in SCORES  # its own validation, not an epoch's scripted one


def test_an_ensemble_member_named_averaged_loads_averaged_pt(averaged_run):
    r = averaged_run
    cfg = r.cfg
    cfg.infer.ensemble[0].checkpoint = "averaged"
    try:
        (member,) = ensemble_members(cfg)
    finally:
        cfg.infer.ensemble[0].checkpoint = "best"
    assert member.checkpoint == r.run.averaged
    loaded = load_member(member.checkpoint).model.state_dict()
    saved = load_checkpoint(r.run.averaged)["model"]
    best = load_checkpoint(r.run.best)["model"]
    name = _parameter_names(cfg)[0]
    assert torch.equal(loaded[name], saved[name]) and not torch.equal(loaded[name], best[name])


def test_averaging_survives_a_resume(tiny_root, tmp_path, monkeypatch):
    """Killed after epoch 1's validation (its pool file written, last.pt still epoch 0):
    the resumed run's averaged.pt is still the mean of epochs 0 and 1."""
    copies = tmp_path / "copies"
    copies.mkdir()

    def config(last: int):
        return tiny_config(
            tiny_root, tmp_path, **{"train.epochs": 2, "train.average": {"last": last, "best": 2}}
        )

    cfg = config(2)
    copying = _copying_save_last(copies)

    def killed_at_epoch_1(run, cfg, fold, state, progress):
        if progress.epoch == 1:
            raise KeyboardInterrupt  # like kill -9 before last.pt of epoch 1
        copying(run, cfg, fold, state, progress)

    monkeypatch.setattr(hooks, "save_last", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, 0, progress=False)
    run = RunDir(tmp_path / "runs" / "tiny" / "fold0")
    assert run.pooled(1).is_file() and not run.averaged.exists()
    with pytest.raises(RunError, match=r"train\.average\.last: 2 -> 1"):
        run_training(config(1), 0, resume=True, progress=False)
    monkeypatch.setattr(hooks, "save_last", copying)
    run_training(cfg, 0, resume=True, progress=False)
    ckpt = load_checkpoint(run.averaged)
    assert ckpt["averaged"]["epochs"] == [0, 1]
    assert [p.name for p in run.pool_files()] == ["epoch0000.pt", "epoch0001.pt"]
    mean = _mean_of(copies, [0, 1])
    for name in _parameter_names(cfg):
        torch.testing.assert_close(ckpt["model"][name].double(), mean[name], atol=1e-6, rtol=1e-5)


def test_under_a_time_budget_the_last_k_epochs_reached_are_kept(tmp_path):
    """Where the run ends is not known: every epoch is kept, the oldest beyond k dropped
    (after last.pt is saved), and the mean is over the last k reached."""
    run = RunDir(tmp_path / "fold0")
    avg = Averager(AverageConfig(last=2), epochs=10, timed=True)
    model = torch.nn.Linear(3, 2)
    seen = {}
    for epoch in range(5):
        with torch.no_grad():
            model.weight.fill_(float(epoch * epoch))  # the mean of 3 and 4: (9 + 16) / 2
            model.bias.fill_(-float(epoch))
        seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        avg.after_epoch(epoch, model, run, main=True)
        avg.after_save(run)
    assert avg.epochs_chosen() == [3, 4]
    assert [p.name for p in run.pool_files()] == ["epoch0003.pt", "epoch0004.pt"]
    mean = avg.mean_weights(model, run)
    assert torch.all(mean["weight"] == 12.5) and torch.all(mean["bias"] == -3.5)
    # without a budget only the epochs from epochs - k on are written at all
    plain = Averager(AverageConfig(last=2), epochs=10, timed=False)
    other = RunDir(tmp_path / "fold1")
    for epoch in range(9):
        plain.after_epoch(epoch, model, other, main=True)
    assert plain.epochs_chosen() == [8] and len(other.pool_files()) == 1


def test_a_run_cut_by_its_budget_averages_the_epochs_it_reached(tiny_root, tmp_path):
    extra = {"train.max_train_minutes": 1e-4, "train.epochs": 6, "train.average": {"last": 3}}
    result = run_training(tiny_config(tiny_root, tmp_path, **extra), 0, progress=False)
    assert result.epochs_done == 1 and result.averaged_dice is not None
    assert load_checkpoint(RunDir(result.run_dir).averaged)["averaged"]["epochs"] == [0]


@pytest.mark.parametrize(
    ("values", "key", "words"),
    [
        ({"train.epochs": 5, "train.average": {"last": 10}}, "train.average.last", "<= train"),
        (
            {"train.epochs": 4, "train.val_every": 2, "train.average": {"best": 3}},
            "train.average.best",
            "2 validation",
        ),
        ({"train.average": {"lats": 2}}, "train.average.lats", "unknown key"),
        ({"train.average": {"best": 0}}, "train.average.best", ">= 1"),
    ],
    ids=["last-beyond-epochs", "best-beyond-validations", "unknown-key", "k-below-1"],
)
def test_a_request_the_run_cannot_satisfy_is_one_line_before_any_work(
    tiny_root, tmp_path, capsys, values, key, words
):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tiny_root, tmp_path, **values)
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    rc = train_script.main(args + tiny_overrides(tiny_root, tmp_path, **values))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error:") and key in err and words in err and "command line" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()
