"""Real processes killed with SIGKILL (training, a checkpoint save, inference); the next
run recovers: finished files valid, nothing partial under a final name, no leftovers,
no orphan process of the killed run.

The scripts run through a small wrapper written by ``_wrapper``: with ``FAULT=slow-save``
it makes the second ``last.pt`` save hang after writing, with ``FAULT=slow-infer`` each
submission row block hang, so a kill lands inside them. The library reads no test variable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonecomp.checkpoint import load_checkpoint
from bonecomp.classes import NUM_CLASSES
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.engine import OOFWriter, StepContext, validate
from bonecomp.fileio import remove_stale_temps, replace_dir
from bonecomp.inference.ensemble import load_member
from bonecomp.losses import build_loss
from bonecomp.submission import validate_submission
from bonecomp.testing import DEMO_CONFIG, REPO, tiny_config, tiny_overrides
from bonecomp.training.data import build_loaders, fold_split, prepare_cache

WRAPPER = """
import os, sys, time
sys.path.insert(0, {scripts!r})
fault = os.environ.get("FAULT", "")
if fault == "slow-save":
    import torch
    real, saves = torch.save, []
    def slow(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if "last.pt" in str(getattr(f, "name", "")):
            saves.append(1)
            if len(saves) == 2:  # epoch 1's last.pt: epoch 0's is already in place
                f.flush()
                time.sleep(120)
    torch.save = slow
if fault == "slow-infer":
    from bonecomp import submission
    add = submission.SubmissionWriter.add
    def slow_add(self, *args, **kwargs):
        add(self, *args, **kwargs)
        time.sleep(120)
    submission.SubmissionWriter.add = slow_add
if fault == "slow-commit":  # every validation beats the one before (epoch 1 is a new
    # best); the kill lands after epoch 1's best.pt, before its maps are committed
    from bonecomp.training import fold, hooks
    real_validate, real_commit, seen = fold.validate, hooks.commit_oof, []
    def better(*args, **kwargs):
        val = real_validate(*args, **kwargs)
        seen.append(1)
        val.metrics["dice"] += len(seen)
        return val
    def slow_commit(run):
        if len(seen) == 2:
            open(os.environ["FAULT_MARK"], "w").close()
            time.sleep(120)
        real_commit(run)
    fold.validate, hooks.commit_oof = better, slow_commit
if __name__ == "__main__":  # worker processes (spawn) re-import this file
    import {script} as script
    sys.exit(script.main(sys.argv[1:]))
"""


def _wrapper(tmp_path: Path, script: str) -> Path:
    path = tmp_path / f"run_{script}.py"
    path.write_text(WRAPPER.format(scripts=str(REPO / "scripts"), script=script))
    return path


def _start(tmp_path: Path, script: str, args: list[str], fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAULT": fault}
    env["FAULT_MARK"] = str(tmp_path / "fault-reached")
    cmd = [sys.executable, str(_wrapper(tmp_path, script)), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path
    )


def _wait_for(proc: subprocess.Popen, found, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not found():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.05)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _no_orphans(marker: str, timeout: float = 20) -> None:
    """No process of the killed run (its DataLoader workers share its command line)."""
    t0 = time.monotonic()
    while True:
        table = subprocess.run(["ps", "-eo", "pid,ppid,cmd"], capture_output=True, text=True)
        left = [ln for ln in table.stdout.splitlines() if marker in ln and "ps -eo" not in ln]
        if not left:
            return
        assert time.monotonic() - t0 < timeout, f"orphan processes: {left}"
        time.sleep(0.5)


def _temps(folder: Path) -> list[Path]:
    return list(folder.rglob(".*.tmp-*"))


def _train_args(tiny_root: Path, tmp_path: Path, resume: bool = False) -> list[str]:
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet", *(["--resume"] * resume)]
    extra = {"train.epochs": 3, "data.num_workers": 2}
    return args + tiny_overrides(tiny_root, tmp_path, **extra)


def _resume_and_check(tiny_root: Path, tmp_path: Path, run: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(_wrapper(tmp_path, "train")), *_train_args(tiny_root, tmp_path, True)],
        env={**os.environ, "PYTHONPATH": str(REPO), "FAULT": ""},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = pd.read_csv(run / "summary.csv")
    assert summary["epoch"].tolist() == [0, 1, 2]  # each epoch once, in order
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    load_checkpoint(run / "best.pt")
    assert _temps(run) == []


def test_kill9_during_training_then_resume(tiny_root, tmp_path):
    run = tmp_path / "runs" / "tiny" / "fold0"
    proc = _start(tmp_path, "train", _train_args(tiny_root, tmp_path))
    _wait_for(proc, (run / "last.pt").is_file)
    _kill9(proc)
    _no_orphans(str(tmp_path))
    _resume_and_check(tiny_root, tmp_path, run)


def test_kill9_during_a_checkpoint_save_then_resume(tiny_root, tmp_path):
    run = tmp_path / "runs" / "tiny" / "fold0"
    proc = _start(tmp_path, "train", _train_args(tiny_root, tmp_path), fault="slow-save")
    _wait_for(proc, lambda: (run / "last.pt").is_file() and any(run.glob(".last.pt.tmp-*")))
    _kill9(proc)
    _no_orphans(str(tmp_path))
    assert [p.name for p in _temps(run)] == [f".last.pt.tmp-{proc.pid}"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 0  # the final name is whole
    _resume_and_check(tiny_root, tmp_path, run)


def test_kill9_during_inference_then_the_next_run_recovers(tiny_root, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from test_checkpoint import _ours

    ckpt = _ours(tmp_path / "model.pt", tiny_root, tmp_path)
    out = tmp_path / "subs" / "final.csv"
    args = ["--checkpoints", str(ckpt), "--config", str(DEMO_CONFIG), "--out", str(out)]
    args += ["--quiet", *tiny_overrides(tiny_root, tmp_path)]
    proc = _start(tmp_path, "infer", args, fault="slow-infer")
    _wait_for(proc, lambda: (out.parent / f".final.csv.tmp-{proc.pid}").is_file())
    _kill9(proc)
    _no_orphans(str(tmp_path))
    assert not out.exists()  # nothing partial under the final name
    again = _start(tmp_path, "infer", args)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    assert _temps(out.parent) == []  # the killed run's leftover removed
    test = discover(tiny_root, "test")
    report = validate_submission(out, test["name"].tolist(), (128, 128))
    assert report.ok, report.problems


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_folder_replace_killed_between_its_renames_is_undone(tmp_path):
    """``replace_dir`` moves the old folder aside, then the new one in: a kill between
    the two leaves only ``.<name>.old-<pid>``, which the next run puts back."""
    pid = _dead_pid()
    pseudo = tmp_path / "pseudo"
    old = tmp_path / f".pseudo.old-{pid}"
    new = tmp_path / f".pseudo.tmp-{pid}"
    for folder, text in ((old, "old"), (new, "half")):
        folder.mkdir()
        (folder / "meta.json").write_text(text)
    assert sorted(remove_stale_temps(tmp_path)) == sorted([old, new])
    assert [p.name for p in tmp_path.iterdir()] == ["pseudo"]
    assert (pseudo / "meta.json").read_text() == "old"
    # Killed after the second rename: the new folder is in place, the old one goes.
    old.mkdir()
    (old / "meta.json").write_text("older")
    assert remove_stale_temps(tmp_path) == [old]
    assert [p.name for p in tmp_path.iterdir()] == ["pseudo"]
    assert (pseudo / "meta.json").read_text() == "old"
    # A finished replace leaves only the new folder.
    new.mkdir()
    (new / "meta.json").write_text("new")
    replace_dir(new, pseudo)
    assert [p.name for p in tmp_path.iterdir()] == ["pseudo"]
    assert (pseudo / "meta.json").read_text() == "new"


def _best_maps(tiny_root: Path, tmp_path: Path, run: Path) -> np.ndarray:
    """The out-of-fold maps best.pt gives, computed here: its model validated on fold 0's
    validation images through the same ``validate`` and ``OOFWriter`` training uses."""
    cfg = tiny_config(tiny_root, tmp_path)
    folds, cache = prepare_cache(cfg, discover(tiny_root), Dist(), False)
    train_idx, val_idx = fold_split(folds, 0)
    data = build_loaders(cfg, cache, train_idx, val_idx)
    size = cfg.train.oof_size
    maps = np.zeros((len(val_idx), NUM_CLASSES, size, size), np.float16)
    writer = OOFWriter(maps, {int(i): r for r, i in enumerate(val_idx)}, size)
    ctx = StepContext(torch.device("cpu"), progress=False, soft_targets=cfg.data.soft_targets)
    model = load_member(run / "best.pt").model
    validate(model, data.val_loader, cache, build_loss(cfg.loss), ctx, 0.5, writer)
    return maps


def test_kill9_between_best_pt_and_its_oof_maps_then_resume(tiny_root, tmp_path, capsys):
    """Killed after epoch 1's best.pt, before its OOF maps were committed: threshold tuning
    refuses the maps (epoch 0's) in one line; ``--resume`` commits epoch 1's maps, which
    the killed process had staged (the re-run epoch ties best.pt's score, so it would never
    commit them again), and the run ends with the maps of best.pt's epoch."""
    run = tmp_path / "runs" / "tiny" / "fold0"
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    args += tiny_overrides(tiny_root, tmp_path, **{"train.report": False})  # 2 epochs
    proc = _start(tmp_path, "train", args, fault="slow-commit")
    _wait_for(proc, (tmp_path / "fault-reached").is_file)
    _kill9(proc)
    _no_orphans(str(tmp_path))
    assert load_checkpoint(run / "best.pt")["epoch"] == 1
    sys.path.insert(0, str(REPO / "scripts"))
    import train as train_script
    import tune_thresholds

    tune = ["--config", str(DEMO_CONFIG), "--quiet", *tiny_overrides(tiny_root, tmp_path)]
    assert tune_thresholds.main(tune) == 2
    err = capsys.readouterr().err.strip()
    assert "maps of epoch 0, but best.pt is epoch 1" in err and "--resume" in err, err
    assert "\n" not in err
    assert train_script.main([*args, "--resume"]) == 0  # re-runs epoch 1
    assert pd.read_csv(run / "summary.csv")["epoch"].tolist() == [0, 1] and _temps(run) == []
    assert "committed the out-of-fold maps of best epoch 1" in capsys.readouterr().out
    best = load_checkpoint(run / "best.pt")["epoch"]
    got = np.load(run / "oof.npy")
    want = _best_maps(tiny_root, tmp_path, run)
    assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() < 1e-3, best
    assert tune_thresholds.main(tune) == 0
