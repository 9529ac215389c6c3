"""A trained run folder whose files were damaged or misnamed afterwards: each is one line
naming the file and the way out, never a traceback or a wrong way out (issue 29, case 14)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bonecomp.checkpoint import CheckpointError, load_checkpoint
from bonecomp.checks import check_config
from bonecomp.config import AverageConfig, ConfigError
from bonecomp.models import create_model
from bonecomp.runs import RunDir
from bonecomp.testing import DEMO_CONFIG, REPO, tiny_config, tiny_overrides
from bonecomp.training import run_training
from bonecomp.training.average import Averager

sys.path.insert(0, str(REPO / "scripts"))
import train as train_script

AVERAGE = {"train.average": {"last": 2}}  # a {last: 2} run: pool files of epochs 0 and 1


@pytest.fixture(scope="module")
def trained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-epoch run with ``train.average: {last: 2}`` (its work folder)."""
    work = tmp_path_factory.mktemp("work")
    run_training(tiny_config(tiny_root, work, **AVERAGE), 0, progress=False)
    return work


@pytest.fixture
def work(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained work folder (runs only; the cache is shared)."""
    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path


def _resume(tiny_root: Path, work: Path, capsys) -> tuple[int, str]:
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet", "--resume"]
    args += tiny_overrides(tiny_root, work, **AVERAGE)
    code = train_script.main(args)
    return code, capsys.readouterr().err.strip()


def test_a_damaged_pool_file_names_its_key_and_not_a_retrain(trained, tmp_path):
    """A pool file that does not read, in a ``{last: 2}`` run: named as
    ``train.average.last``'s epoch (not ``.best``), and the way out is not "delete the
    fold" (best.pt and last.pt are whole)."""
    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs)
    run = RunDir(runs / "tiny" / "fold0")
    pooled = run.pooled(1)
    pooled.write_bytes(pooled.read_bytes()[:1000])
    cfg = tiny_config(tmp_path, tmp_path, **AVERAGE)
    avg = Averager.build(AverageConfig(last=2), 2, False)
    avg.load_state_dict(load_checkpoint(run.last)["average"])
    with pytest.raises(CheckpointError) as e:
        avg.mean_weights(create_model(cfg.model), run)
    msg = str(e.value)
    assert msg.startswith(
        f"{pooled}: cannot read the weights of epoch 1 kept for train.average.last"
    )
    assert ".best" not in msg and "delete the fold" not in msg and "\n" not in msg


def test_an_empty_summary_csv_neither_breaks_resume_nor_the_report(tiny_root, work, capsys):
    run = work / "runs" / "tiny" / "fold0"
    (run / "summary.csv").write_text("")
    code, err = _resume(tiny_root, work, capsys)
    assert code == 0, err
    import report as report_script

    assert report_script.main([str(work / "runs" / "tiny"), "--quiet"]) == 0
    assert "error" not in capsys.readouterr().err


def test_a_truncated_best_pt_on_resume_says_to_delete_it(tiny_root, work, capsys):
    best = work / "runs" / "tiny" / "fold0" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    code, err = _resume(tiny_root, work, capsys)
    assert code == 2 and err.startswith(f"error: {best}: ") and "\n" not in err, err
    assert "delete it" in err and "save it again" not in err


def test_init_from_a_folder_says_it_is_a_folder(trained, tiny_root, tmp_path):
    folder = trained / "runs" / "tiny" / "fold0"
    cfg = tiny_config(tiny_root, tmp_path, **{"train.init_from": str(folder)})
    with pytest.raises(ConfigError, match=rf"train\.init_from: {folder} is a folder, not a "):
        check_config(cfg)
