"""Bad checkpoint files end in one line naming the file, through scripts/infer.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from bonecomp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bonecomp.classes import CLASSES
from bonecomp.config import to_dict
from bonecomp.models import create_model
from bonecomp.testing import DEMO_CONFIG, REPO, tiny_config, tiny_overrides

sys.path.insert(0, str(REPO / "scripts"))
import infer as infer_script


class NotTensors:
    """A class a checkpoint must never hold: unpickling it could run code."""


def _ours(path: Path, tiny_root: Path, work: Path) -> Path:
    """A genuine bonecomp checkpoint of the tiny model (untrained)."""
    cfg = tiny_config(tiny_root, work)
    model = create_model(cfg.model)
    save_checkpoint(
        path,
        {
            "config": to_dict(cfg),
            "classes": list(CLASSES),
            "fold": 0,
            "input_size": cfg.data.image_size,
            "epoch": 0,
            "metric": 0.0,
            "model": model.state_dict(),
        },
    )
    return path


def _random(p: Path, *_) -> None:
    p.write_bytes(os.urandom(4096))


def _empty(p: Path, *_) -> None:
    p.write_bytes(b"")


def _truncated(p: Path, root: Path, work: Path) -> None:
    data = _ours(work / "good.pt", root, work).read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _state_dict(p: Path, *_) -> None:
    torch.save({"encoder.conv1.weight": torch.zeros(2, 3)}, p)


def _unsafe(p: Path, *_) -> None:
    torch.save({"format": "bonecomp-checkpoint-1", "model": NotTensors()}, p)


def _misfit(p: Path, root: Path, work: Path) -> None:
    ckpt = torch.load(_ours(work / "good.pt", root, work), weights_only=True)
    first = next(iter(ckpt["model"]))
    ckpt["model"][first] = torch.zeros(1)  # wrong shape
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    torch.save(ckpt, p)


CASES = {
    "random bytes": (_random, "not a PyTorch checkpoint"),
    "empty": (_empty, "empty file"),
    "truncated": (_truncated, "truncated"),
    "plain state_dict": (_state_dict, "plain state_dict"),
    "unsafe pickle": (_unsafe, "NotTensors"),
    "weights misfit": (
        _misfit,
        "do not fit the model its own config describes (0 missing, 1 "
        "unexpected, 1 of another shape)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_line_naming_the_file(case, tiny_root, tmp_path, capsys):
    make, fragment = CASES[case]
    bad = tmp_path / "bad.pt"
    make(bad, tiny_root, tmp_path)
    args = ["--checkpoints", str(bad), "--config", str(DEMO_CONFIG), "--quiet"]
    code = infer_script.main(args + tiny_overrides(tiny_root, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(bad) in lines[0] and fragment in lines[0]
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not any(tmp_path.glob("submissions/*"))


def test_good_checkpoint_still_loads(tiny_root, tmp_path):
    ckpt = load_checkpoint(_ours(tmp_path / "good.pt", tiny_root, tmp_path))
    assert ckpt["input_size"] == 64


def test_checkpoint_missing_its_parts_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"classes": list(CLASSES)})
    with pytest.raises(CheckpointError, match=r"x\.pt: bonecomp checkpoint without config, model"):
        load_checkpoint(path)


def test_resume_from_a_damaged_last_pt_is_one_line(tiny_root, tmp_path, capsys):
    import train as train_script

    last = tmp_path / "runs" / "tiny" / "fold0" / "last.pt"
    last.parent.mkdir(parents=True)
    _truncated(last, tiny_root, tmp_path)
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--resume", "--quiet"]
    assert train_script.main(args + tiny_overrides(tiny_root, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(last) in err and "truncated" in err
