"""What can be known before the long cache build is refused before it, in one line naming
the key, leaving no run folder and no cache (issue 29, case 7): a ``model.encoder_weights``
file that is missing, does not fit the encoder or is not safe to load; more folds than
patients; an MLflow server that does not answer."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from bonecomp.testing import DEMO_CONFIG, REPO, tiny_overrides

sys.path.insert(0, str(REPO / "scripts"))
import train as train_script


class NotTensors:
    """A class a weights file must never hold: unpickling it could run code."""


def _train(data: Path, work: Path, capsys, **extra) -> tuple[int, str]:
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    code = train_script.main(args + tiny_overrides(data, work, **extra))
    return code, capsys.readouterr().err.strip()


def _nothing_done(work: Path) -> None:
    assert not (work / "cache").exists(), "the cache was built before the refusal"
    assert not (work / "runs").exists(), "a run folder was claimed before the refusal"


def _weights_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    misfit = tmp / "other.pth"
    torch.save({"conv9.weight": torch.zeros(3, 3)}, misfit)
    unsafe = tmp / "unsafe.pth"
    torch.save({"state_dict": NotTensors()}, unsafe)
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(b"\x00not a weights file at all" * 10)
    return {
        "missing": (tmp / "none.pth", "is not a file"),
        "misfit": (misfit, "no tensor matches the encoder's parameters"),
        "unsafe": (unsafe, "refused, since loading it could run arbitrary code"),
        "garbage": (garbage, "not a PyTorch checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "misfit", "unsafe", "garbage"])
def test_an_unusable_encoder_weights_file_is_one_line_before_the_cache(
    case, tiny_root, tmp_path, capsys
):
    path, says = _weights_files(tmp_path)[case]
    code, err = _train(tiny_root, tmp_path, capsys, **{"model.encoder_weights": str(path)})
    assert code == 2 and err.startswith("error: command line: model.encoder_weights: "), err
    assert str(path) in err and says in err and "\n" not in err, err
    assert "weights_only" not in err
    _nothing_done(tmp_path)


def test_more_folds_than_patients_names_the_key_before_the_cache(tiny_root, tmp_path, capsys):
    """The phantom has 5 training patients: 6 folds cannot be filled."""
    code, err = _train(tiny_root, tmp_path, capsys, **{"data.n_splits": 6})
    assert code == 2 and "\n" not in err, err
    assert "data.n_splits=6" in err and "5 patients" in err, err
    _nothing_done(tmp_path)  # no cache, and no empty fold0/ left behind


def test_an_mlflow_server_that_does_not_answer_is_one_line_within_seconds(
    tiny_root, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("mlflow")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    code, err = _train(tiny_root, tmp_path, capsys, **{"train.trackers": ["mlflow"]})
    assert code == 2 and "\n" not in err, err
    assert (
        "train.trackers[0]" in err and f"127.0.0.1:{port}" in err and "MLFLOW_TRACKING_URI" in err
    )
    assert time.monotonic() - t0 < 60  # not MLflow's minutes of retries
    _nothing_done(tmp_path)
