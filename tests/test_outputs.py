"""Output folders that cannot be written (read-only, full disk) end in one line naming
the folder, exit 2, and leave no temporary file behind.

A full disk is simulated by a file whose ``write`` raises ``ENOSPC``, or is real: a small
tmpfs (the kernel's ENOSPC; a memory map written past it is a SIGBUS) and ``ulimit -f``
(EFBIG) under training's big files; a read-only file system by ``open`` raising
``EROFS``; a read-only folder by ``chmod`` (skipped as root, whom permissions do not
stop).
"""

from __future__ import annotations

import builtins
import errno
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bonecomp import fileio, submission
from bonecomp.fileio import OutputError, atomic_write
from bonecomp.testing import DEMO_CONFIG, REPO, tiny_overrides

sys.path.insert(0, str(REPO / "scripts"))
import infer as infer_script
import train as train_script


class _FullDiskFile:
    """A real file whose writes fail as on a full disk."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _patch_open(monkeypatch, module, under: str, failure: str) -> None:
    """``module``'s ``open`` fails for paths containing ``under``: ``failure`` is "full"
    (writes raise ENOSPC) or "readonly" (opening raises EROFS)."""

    def fake_open(path, *args, **kwargs):
        if under not in str(path):
            return builtins.open(path, *args, **kwargs)
        if failure == "readonly":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _FullDiskFile(builtins.open(path, *args, **kwargs))

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp-*")] if folder.exists() else []


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_atomic_write_on_a_full_disk_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    _patch_open(monkeypatch, fileio, "out", "full")
    target = tmp_path / "out" / "x.txt"
    with (
        pytest.raises(
            OutputError, match=r"cannot write x\.txt in .*out: the folder is on a full disk"
        ),
        atomic_write(target) as f,
    ):
        f.write("hello")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "failure, fragment",
    [("full", "is on a full disk"), ("readonly", "is on a read-only file system")],
)
def test_training_into_an_unwritable_runs_folder_is_one_line(
    failure, fragment, tiny_root, tmp_path, monkeypatch, capsys
):
    _patch_open(monkeypatch, fileio, "/runs/", failure)
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    assert train_script.main(args + tiny_overrides(tiny_root, tmp_path)) == 2
    err = _one_line(capsys)
    run = tmp_path / "runs" / "tiny" / "fold0"
    assert err.startswith("error: cannot write ") and f"in {run}: the folder {fragment}" in err
    assert _temps(tmp_path / "runs") == []


def _checkpoint(tiny_root, tmp_path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from test_checkpoint import _ours

    return _ours(tmp_path / "model.pt", tiny_root, tmp_path)


def test_a_submission_on_a_full_disk_is_one_line_and_no_temp(
    tiny_root, tmp_path, monkeypatch, capsys
):
    ckpt = _checkpoint(tiny_root, tmp_path)
    _patch_open(monkeypatch, submission, "subs", "full")
    out = tmp_path / "subs" / "x.csv"
    args = ["--checkpoints", str(ckpt), "--config", str(DEMO_CONFIG), "--out", str(out)]
    assert infer_script.main([*args, "--quiet", *tiny_overrides(tiny_root, tmp_path)]) == 2
    err = _one_line(capsys)
    assert f"cannot write x.csv in {out.parent}: the folder is on a full disk" in err
    assert list(out.parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_submissions_folder_is_one_line(tiny_root, tmp_path, capsys):
    ckpt = _checkpoint(tiny_root, tmp_path)
    out = tmp_path / "subs" / "x.csv"
    out.parent.mkdir()
    out.parent.chmod(0o555)
    try:
        args = ["--checkpoints", str(ckpt), "--config", str(DEMO_CONFIG), "--out", str(out)]
        assert infer_script.main([*args, "--quiet", *tiny_overrides(tiny_root, tmp_path)]) == 2
    finally:
        out.parent.chmod(0o755)
    err = _one_line(capsys)
    assert f"cannot write x.csv in {out.parent}: the folder is read-only" in err
    assert list(out.parent.iterdir()) == []


# --------------------------------------------- real full disks (issue 29, case 3)
@pytest.fixture
def small_disk(tmp_path):
    """``make(megabytes)``: a tmpfs of that size (a full disk for real: the kernel's
    ENOSPC, and a SIGBUS for a memory map written past it); skipped where mounting is not
    permitted."""
    mounts = []

    def make(megabytes: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield make
    gc.collect()  # a memory map of a refused run may still hold a file there
    for where in mounts:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # once unused


def _train_process(tiny_root: Path, work: Path, **extra) -> subprocess.CompletedProcess:
    """train.py in a process of its own (a SIGBUS must not hit the test's process), one
    epoch of the tiny recipe."""
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    args += tiny_overrides(tiny_root, work, **{"train.epochs": 1, "train.report": False, **extra})
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=work, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def _refused_cleanly(done, name: str, cause: str, run: Path) -> None:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot write {name} in "), err
    assert cause in err, err
    left = [p.name for p in run.iterdir()] if run.exists() else []
    assert not [n for n in left if n in (".lock",) or ".staged" in n or ".tmp-" in n], left


def test_a_full_disk_under_the_oof_memory_map_is_one_line_not_a_sigbus(
    tiny_root, tmp_path, small_disk
):
    """train.oof_size=1024: the staged map (2 images x 29 x 1024^2 x 2 bytes = 116 MiB)
    does not fit a 20 MB disk; its blocks are reserved before the map is written."""
    runs = small_disk(20)
    done = _train_process(
        tiny_root, tmp_path, **{"train.output_dir": str(runs), "train.oof_size": 1024}
    )
    _refused_cleanly(done, ".oof.npy.staged", "full disk", runs / "tiny" / "fold0")


def test_a_full_disk_while_saving_last_pt_is_one_line_not_torchs_error(
    tiny_root, tmp_path, small_disk, capsys
):
    """best.pt (9 MB) fits a 20 MB disk, last.pt (model + optimiser, 28 MB) does not:
    torch's own writer meets the kernel's ENOSPC (not a fake file object)."""
    runs = small_disk(20)
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    extra = {"train.epochs": 1, "train.report": False, "train.output_dir": str(runs)}
    assert train_script.main(args + tiny_overrides(tiny_root, tmp_path, **extra)) == 2
    err = capsys.readouterr().err.strip()
    done = subprocess.CompletedProcess([], 2, "", err)
    _refused_cleanly(done, "last.pt", "full disk", runs / "tiny" / "fold0")
    assert "enforce fail" not in err


SAVE_UNDER_A_LIMIT = """
import resource, sys, torch
from bonecomp.checkpoint import save_checkpoint
from bonecomp.fileio import OutputError
resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))  # ulimit -f: 10 MB
try:
    save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(5_000_000)}})  # 20 MB
except OutputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE) under a checkpoint: EFBIG, named as such."""
    path = tmp_path / "fold0" / "best.pt"
    done = subprocess.run(
        [sys.executable, "-c", SAVE_UNDER_A_LIMIT, str(path)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )  # fmt: skip
    _refused_cleanly(done, "best.pt", "file size limit (ulimit -f)", path.parent)
    assert not path.exists()
