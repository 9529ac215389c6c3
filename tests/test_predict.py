"""Inference end to end on a tiny trained model: a valid CSV whose score equals the
metric, thresholds that move the masks, tuning that never lowers the OOF Dice."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bonecomp import rle
from bonecomp.data.annotations import load_annotation
from bonecomp.data.layout import discover
from bonecomp.inference.predict import find_checkpoints, predict_submission
from bonecomp.inference.thresholds import (
    choose,
    default_thresholds_path,
    grid_dice,
    oof_items,
    read_thresholds,
)
from bonecomp.metrics import summarize
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
    ckpts = find_checkpoints(cfg, ensemble=True)
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
    ckpts = find_checkpoints(cfg, ensemble=False)
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
    run = work / "runs" / "tiny" / "fold0"
    dice, n = grid_dice(oof_items([run], tiny_root, progress=False))
    res = choose(dice)
    assert n == 2 and (res.after.per_class >= res.before.per_class).all()
    assert res.after.mean >= res.before.mean

    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_thresholds

    args = [
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--quiet",
        *tiny_overrides(
            tiny_root, work, **{"infer.ensemble": [{"experiment": "tiny", "folds": [0]}]}
        ),
    ]
    assert tune_thresholds.main(args) == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "OOF mean Dice" in out
    path = Path(work / "runs" / "thresholds_demo.json")
    assert path == default_thresholds_path(cfg) and len(read_thresholds(path)[0]) == 29
