"""--resume refuses a config that changes what the run computes; the keys that may change
are those declared ``json_schema_extra=RESUME`` in bonecomp/config.py."""

from __future__ import annotations

import pytest

from bonecomp.checkpoint import save_checkpoint
from bonecomp.classes import CLASSES
from bonecomp.config import Config, resume_may_change, to_dict
from bonecomp.runs import RunDir, RunError
from bonecomp.training.state import RESUME_MAY_CHANGE, check_resumable


def _run(tmp_path, cfg: Config) -> RunDir:
    run = RunDir(tmp_path / "runs" / "x" / "fold0")
    run.path.mkdir(parents=True)
    payload = {"config": to_dict(cfg), "model": {}, "input_size": 512, "classes": list(CLASSES)}
    save_checkpoint(run.last, payload)
    return run


def _with(cfg: Config, section: str, **values) -> Config:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def test_the_resume_set_comes_from_the_declarations():
    assert resume_may_change() == RESUME_MAY_CHANGE


@pytest.mark.parametrize(
    "section, values",
    [
        ("train", {"device": "cpu", "micro_batch": "auto", "compile": True}),
        ("data", {"root": "elsewhere", "num_workers": 0}),
        ("infer", {"name": "other", "tta": ["none"]}),  # the whole section may change
    ],
)
def test_keys_declared_resumable_may_change(tmp_path, section, values):
    run = _run(tmp_path, Config())
    check_resumable(_with(Config(), section, **values), run)


def test_other_keys_are_refused_naming_the_change(tmp_path):
    run = _run(tmp_path, Config())
    with pytest.raises(RunError, match=r"different config \(train\.epochs: 40 -> 41\); resume"):
        check_resumable(_with(Config(), "train", epochs=41, device="cpu"), run)
    with pytest.raises(RunError, match=r"train\.val_overlap: 0\.25 -> 0\.5\); resume"):
        check_resumable(_with(Config(), "train", val_overlap=0.5), run)  # picks best.pt
    with pytest.raises(RunError, match=r"loss\.terms\.focal: None -> 0\.5"):
        check_resumable(_with(Config(), "loss", terms={"bce": 0.5, "dice": 0.5, "focal": 0.5}), run)
