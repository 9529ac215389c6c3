"""Inference end to end on a tiny trained model: a valid CSV whose score equals the
metric, thresholds that move the masks, tuning that never lowers the OOF Dice."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
import torch

from bonecomp import rle
from bonecomp.classes import CLASSES
from bonecomp.config import ConfigError
from bonecomp.data.annotations import load_annotation
from bonecomp.data.images import read_image
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
from bonecomp.testing import (
    classic_decode,
    dense_dice,
    dense_truth,
    tiny_config,
    tiny_overrides,
)
from bonecomp.training import run_training


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cfg = tiny_config(tiny_root, work, **{"train.epochs": 2})
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


def _masks(path) -> dict[tuple[str, str], np.ndarray]:
    """(image, class) -> its mask, decoded by the competition baseline's decoder."""
    df = read_submission(path)
    return {
        (img, cls): classic_decode(code, 128, 128) if code else np.zeros((128, 128), np.uint8)
        for img, cls, code in zip(df["image_name"], df["class"], df["rle"], strict=True)
    }


def test_each_class_threshold_of_the_file_reaches_that_class_masks_in_the_csv(
    trained, tiny_root, tmp_path
):
    """A thresholds file as ``tune_thresholds.py`` writes it, a low threshold for some
    classes and a high one for the others: each class's masks in the CSV are the masks of
    a run with that threshold for every class (``infer.threshold``)."""
    _, work = trained
    low, high = 0.1, 0.7
    keys = {"infer.name": "per_class", "infer.tta": ["none"]}  # not thresholds_demo.json

    def submission(name: str, **extra) -> dict:
        cfg = tiny_config(tiny_root, work, **keys, **extra)
        return _masks(predict_submission(cfg, ensemble_members(cfg), tmp_path / name).path)

    same = {t: submission(f"all_{t}.csv", **{"infer.threshold": t}) for t in (low, high)}
    # the classes whose masks the two thresholds tell apart, given low and high in turn
    moved = sorted(
        {CLASSES.index(c) for (i, c), m in same[low].items() if (m != same[high][i, c]).any()}
    )
    assert len(moved) >= 4, "too few classes predicted: the test would prove little"
    per_class = [high] * len(CLASSES)
    for c in moved[::2]:
        per_class[c] = low
    run = work / "runs" / "tiny" / "fold0"
    path = write_thresholds(tmp_path / "thr.json", per_class, grid=[low, 0.5, high],
                            oof_images=2, runs=[str(run)])  # fmt: skip
    got = submission("file.csv", **{"infer.thresholds": str(path)})
    assert got.keys() == same[low].keys()
    for (img, cls), mask in got.items():
        want = same[per_class[CLASSES.index(cls)]][img, cls]
        np.testing.assert_array_equal(mask, want, err_msg=f"{img} {cls}")


def test_inference_writes_each_image_at_its_own_size(trained, tiny_root, tiny_copy, tmp_path):
    """Test PNGs of three sizes: each image's masks are written, and validated, at its
    own size (the 160 x 160 image has runs past the 16384 pixels of a 128 x 128 one)."""
    _, work = trained  # a low threshold: the tiny model's masks are not empty
    cfg = tiny_config(tiny_root, work, **{"infer.threshold": 0.05, "infer.name": "sizes"})
    sizes = [(128, 128), (96, 160), (160, 160), (128, 128)]
    test = discover(tiny_copy, "test")
    for path, (h, w) in zip(test["image_path"], sizes, strict=True):
        cv2.imwrite(str(path), cv2.resize(read_image(path), (w, h)))
    res = predict_submission(cfg, ensemble_members(cfg), tmp_path / "s.csv", tiny_copy, False)
    assert res.report.ok, res.report.problems
    df = read_submission(res.path)
    for name, (h, w) in zip(test["name"], sizes, strict=True):
        runs = [
            np.asarray(c.split(), int).reshape(-1, 2)
            for c in df.loc[df["image_name"] == name, "rle"]
        ]
        last = max((int((r[:, 0] + r[:, 1] - 1).max()) for r in runs if len(r)), default=0)
        assert last <= h * w, name
        if (h, w) == (160, 160):
            assert last > 128 * 128  # drawn at 160 x 160, not at the training images' size


def _fed(monkeypatch) -> list[torch.Tensor]:
    """Every input the ensemble's models are fed from now on (their forward's argument)."""
    from bonecomp.inference import ensemble as ensemble_mod

    seen: list[torch.Tensor] = []
    real = ensemble_mod.create_model

    def create(cfg_model):
        net = real(cfg_model)
        net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        return net

    monkeypatch.setattr(ensemble_mod, "create_model", create)
    return seen


def test_the_infer_keys_decide_what_the_models_are_fed(trained, tiny_root, tmp_path, monkeypatch):
    """infer.tta, infer.scales and infer.batch_size set as a user sets them: 4 test images
    in loader batches of 3 and 1, each seen upright and flipped upside down, at 64 px
    and at 1.5 x 64 = 96 px; with infer.sliding_window, 32 px tiles at 3/4 overlap
    (a stride of 8 px: 5 x 5 per 64 px image)."""
    _, work = trained
    seen = _fed(monkeypatch)
    keys = {"infer.tta": ["none", "vflip"], "infer.scales": [1.0, 1.5], "infer.batch_size": 3,
            "infer.name": "fed"}  # fmt: skip
    cfg = tiny_config(tiny_root, work, **keys)
    assert predict_submission(
        cfg, ensemble_members(cfg), tmp_path / "a.csv", progress=False
    ).report.ok
    assert sorted((x.shape[0], x.shape[-1]) for x in seen) == sorted(
        [(3, 64), (3, 64), (3, 96), (3, 96), (1, 64), (1, 64), (1, 96), (1, 96)]
    )
    for size in (64, 96):  # per batch: the upright view and its vertical flip
        views = [x for x in seen if x.shape[0] == 3 and x.shape[-1] == size]
        assert torch.equal(views[1], views[0].flip(-2)) or torch.equal(views[0], views[1].flip(-2))
    seen.clear()
    keys = {"infer.tta": ["none"], "infer.sliding_window": True, "infer.tile": 32,
            "infer.overlap": 0.75, "infer.name": "fed"}  # fmt: skip
    cfg = tiny_config(tiny_root, work, **keys)
    assert predict_submission(
        cfg, ensemble_members(cfg), tmp_path / "b.csv", progress=False
    ).report.ok
    assert {tuple(x.shape[-2:]) for x in seen} == {(32, 32)}
    assert sum(x.shape[0] for x in seen) == 4 * 25


def test_infer_compile_compiles_each_member(trained, tiny_root, tmp_path, monkeypatch):
    _, work = trained
    compiled: list = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)  # a spy
    for on in (False, True):
        cfg = tiny_config(tiny_root, work, **{"infer.compile": on, "infer.name": "c"})
        members = ensemble_members(cfg)
        assert predict_submission(cfg, members, tmp_path / f"{on}.csv", progress=False).report.ok
        assert len(compiled) == (len(members) if on else 0)


def test_the_submission_lands_in_out_dir_under_its_name(trained, tiny_root, tmp_path):
    _, work = trained
    sys.path.insert(0, str(ROOT / "scripts"))
    import infer

    keys = {"infer.out_dir": str(tmp_path / "subs"), "infer.name": "mine"}
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--quiet"]
    assert infer.main(args + tiny_overrides(tiny_root, work, **keys)) == 0
    written = list((tmp_path / "subs").iterdir())
    assert len(written) == 1 and written[0].name.startswith("mine_") and written[0].suffix == ".csv"


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
