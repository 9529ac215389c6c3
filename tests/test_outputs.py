"""Output folders that cannot be written (read-only, full disk) end in one line naming
the folder, exit 2, and leave no temporary file behind.

A full disk is simulated by a file whose ``write`` raises ``ENOSPC``; a read-only file
system by ``open`` raising ``EROFS``; a read-only folder by ``chmod`` (skipped as root,
whom permissions do not stop).
"""

from __future__ import annotations

import builtins
import errno
import os
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
