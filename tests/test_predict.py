"""Inference end to end on a tiny trained model: a valid CSV whose score equals the
metric, thresholds that move the masks, tuning that never lowers the OOF Dice."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bonecomp import rle
from bonecomp.config import ConfigError
from bonecomp.data.annotations import load_annotation
from bonecomp.data.layout import discover
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.thresholds import (
    choose,
    grid_dice,
    oof_items,
    read_thresholds,
    write_thresholds,
)
from bonecomp.metrics import summarize
from bonecomp.runs import MemberSpec, RunError, ensemble_members, thresholds_path
from bonecomp.submission import read_submission, score_submission, validate_submission
from bonecomp.testing import REPO as ROOT
from bonecomp.testing import dense_dice, dense_truth, tiny_config, tiny_overrides
from bonecomp.training import run_training


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cfg = tiny_config(tiny_root, work, **{"train.epochs": 2, "train.lr": 3e-3})
    run_training(cfg, 0, progress=False)
    return cfg, work


def _areas(path):
    df = read_submission(path)
    return np.array([rle.string_to_runs(r, (128, 128))[1].sum() for r in df["rle"]])


def test_submission_is_valid_and_scores_like_the_metric(trained, tiny_root, tmp_path):
    cfg, _ = trained
    ckpts = ensemble_members(cfg, ensemble=True)
    res = predict_submission(cfg, ckpts, tmp_path / "sub.csv", progress=False)
    assert res.report.ok and res.rows == 4 * 29 and res.images == 4
    test = discover(tiny_root, "test")
    assert validate_submission(res.path, test["name"].tolist(), (128, 128)).ok
    table, dice = score_submission(res.path, tiny_root / "test_labels", (128, 128), progress=False)
    sub = read_submission(res.path)
    want = []
    for rel, name in zip(test["rel"], test["name"], strict=True):
        codes = sub.loc[sub["image_name"] == name, "rle"]
        pred = np.stack([rle.decode(c, (128, 128)) for c in codes])
        truth = dense_truth(
            load_annotation(tiny_root / "test_labels" / rel.replace(".png", ".json")), (128, 128)
        )
        want.append(dense_dice(pred, truth))
    np.testing.assert_allclose(dice, np.stack(want), atol=1e-12)
    assert table.mean == pytest.approx(summarize(np.stack(want)).mean)


def test_thresholds_move_the_masks(trained, tmp_path):
    cfg, _ = trained
    ckpts = ensemble_members(cfg, ensemble=False)
    areas = {}
    for t in (0.01, 0.5, 0.9):
        cfg.infer.threshold = t
        areas[t] = _areas(
            predict_submission(cfg, ckpts, tmp_path / f"{t}.csv", progress=False).path
        )
    cfg.infer.threshold = 0.5
    assert (areas[0.01] >= areas[0.5]).all() and (areas[0.5] >= areas[0.9]).all()
    assert areas[0.01].sum() > areas[0.9].sum()


def test_tuning_never_lowers_oof_dice_and_is_picked_up(trained, tiny_root, capsys):
    cfg, work = trained
    member = MemberSpec(work / "runs" / "tiny" / "fold0" / "best.pt")
    dice, n = grid_dice(oof_items([member], tiny_root, progress=False))
    res = choose(dice)
    assert n == 2 and (res.after.per_class >= res.before.per_class).all()
    assert res.after.mean >= res.before.mean

    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_thresholds

    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--quiet"]
    assert tune_thresholds.main(args + tiny_overrides(tiny_root, work)) == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "OOF mean Dice" in out
    path = thresholds_path(cfg)
    assert path == work / "runs" / "thresholds_demo.json"
    tuned, runs = read_thresholds(path)
    assert runs == [str(work / "runs" / "tiny" / "fold0")]
    # Inference resolves the same members and applies exactly the tuned values.
    res = predict_submission(cfg, ensemble_members(cfg), work / "t.csv", progress=False)
    assert res.thresholds == tuned and res.thresholds_from == str(path)


def test_inference_applies_the_thresholds_file_it_names(trained, tmp_path):
    cfg, _ = trained
    path = write_thresholds(tmp_path / "thr.json", [0.3] * 28 + [0.8])
    cfg.infer.thresholds = str(path)
    try:
        res = predict_submission(cfg, ensemble_members(cfg), tmp_path / "s.csv", progress=False)
    finally:
        cfg.infer.thresholds = None
    assert res.thresholds == [0.3] * 28 + [0.8]
    assert "WARNING" not in res.thresholds_from  # no runs recorded: nothing to compare


def test_ensemble_members_refuse_duplicates_and_missing_files(trained):
    cfg, _ = trained
    cfg.infer.ensemble[0].folds = [0, 1]  # fold 1 was never trained
    try:
        with pytest.raises(RunError, match=r"fold1/best\.pt"):
            ensemble_members(cfg)
    finally:
        cfg.infer.ensemble[0].folds = [0]
    twice = [cfg.infer.ensemble[0], cfg.infer.ensemble[0]]
    cfg.infer.ensemble, saved = twice, cfg.infer.ensemble
    try:
        with pytest.raises(
            ConfigError, match=r"infer\.ensemble\[1\]\.experiment 'tiny' is listed more than once"
        ):
            ensemble_members(cfg)
    finally:
        cfg.infer.ensemble = saved


@pytest.mark.parametrize("reader", ["thresholds", "class_weights", "cleanup"])
def test_a_thresholds_file_giving_a_key_twice_is_refused_naming_it(reader, tmp_path):
    """json keeps the last of two equal keys silently: the file is refused instead."""
    from bonecomp.inference.class_weights import read_class_weights
    from bonecomp.inference.cleanup import read_cleanup

    read = {"thresholds": read_thresholds, "class_weights": read_class_weights,
            "cleanup": read_cleanup}[reader]  # fmt: skip
    path = write_thresholds(tmp_path / "thr.json", [0.5] * 29)
    text = path.read_text()
    path.write_text(text.replace('"thresholds":', f'"thresholds": {[0.3] * 29}, "thresholds":', 1))
    with pytest.raises(RunError, match=r"thr\.json: .*key 'thresholds' is given twice"):
        read(path)


def test_a_moved_run_is_not_other_models_for_its_own_thresholds_file(tmp_path):
    """The thresholds file records the run folders it was tuned on; after train.output_dir
    moved, the same experiment and fold are the same models (no warning)."""
    from bonecomp.config import load_config
    from bonecomp.inference.thresholds import resolve_thresholds

    old, new = tmp_path / "old" / "runs", tmp_path / "new" / "runs"
    path = write_thresholds(new / "thr.json", [0.4] * 29, runs=[str(old / "tiny" / "fold0")])
    cfg = load_config(None, [f"infer.thresholds={path}"])
    ts, source = resolve_thresholds(cfg, [MemberSpec(new / "tiny" / "fold0" / "best.pt")])
    assert ts == [0.4] * 29 and source == str(path)
    with pytest.warns(UserWarning, match="not on these models"):
        _, source = resolve_thresholds(cfg, [MemberSpec(new / "tiny" / "fold1" / "best.pt")])
    assert "WARNING" in source
