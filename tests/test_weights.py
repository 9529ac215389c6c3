"""Class-wise ensemble weights: the grid, the choice that never lowers the OOF Dice, two
experiments saved at different OOF sizes, and inference applying exactly the tuned file
(one-hot weights reproduce a single member's CSV byte for byte)."""

from __future__ import annotations

import contextlib
import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bonecomp.classes import CLASSES
from bonecomp.inference.class_weights import (
    choose_weights,
    read_class_weights,
    resolve_class_weights,
    simplex_grid,
    tune_ensemble,
)
from bonecomp.inference.ensemble import Ensemble, Member
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.thresholds import grid_dice, oof_items, write_thresholds
from bonecomp.inference.tta import views
from bonecomp.runs import MemberSpec, RunError, ensemble_members, thresholds_path
from bonecomp.testing import REPO as ROOT
from bonecomp.testing import tiny_config, tiny_overrides
from bonecomp.training import run_training

C = len(CLASSES)
ENSEMBLE = [{"experiment": "tiny", "folds": [0]}, {"experiment": "fcn", "folds": [0]}]
# Two experiments at the same input size (64 px) but different OOF sizes (32 and 64). The
# FCN has the demo's encoder and lr: on the tiny one it draws no mask at 0.2 in 2 epochs.
EXPERIMENTS = {
    "tiny": {"model.arch": "unet", "train.oof_size": 32},
    "fcn": {"model.arch": "fcn8s", "model.encoder": "resnet18", "train.lr": 3e-3,
            "train.oof_size": 64},
}  # fmt: skip


def _overrides(**extra) -> dict:
    return {"train.epochs": 2, "infer.ensemble": ENSEMBLE, **extra}


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    for name, keys in EXPERIMENTS.items():
        cfg = tiny_config(tiny_root, work, **_overrides(**{"train.experiment": name, **keys}))
        run_training(cfg, 0, progress=False)
    return cfg, work


@contextlib.contextmanager
def _infer(cfg, **values):
    """Set ``cfg.infer`` keys for a block; the module's config is shared."""
    saved = {k: getattr(cfg.infer, k) for k in values}
    for k, v in values.items():
        setattr(cfg.infer, k, v)
    try:
        yield cfg
    finally:
        for k, v in saved.items():
            setattr(cfg.infer, k, v)


# ------------------------------------------------------------------------------ choice
def test_simplex_grid_is_coarse_with_a_least_share():
    g = simplex_grid(2, 0.1, 0.1)
    assert g.shape == (9, 2) and np.allclose(g.sum(1), 1) and g.min() >= 0.1 - 1e-12
    assert [0.5, 0.5] in g.tolist()
    g3 = simplex_grid(3, 0.25, 0.25)
    assert sorted(map(tuple, g3.tolist())) == sorted(
        {(0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5)}
    )
    assert simplex_grid(1).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="step"):
        simplex_grid(2, 0.3)
    with pytest.raises(ValueError, match="min_share"):
        simplex_grid(3, 0.1, 0.4)


def test_configured_weights_stay_unless_beaten_by_more_than_min_gain():
    grid = (0.4, 0.5, 0.6)
    dice = np.full((3, 3, 3), 0.5)
    dice[0, 2, 0] = 0.5005  # class 0: another weighting, but by less than min_gain
    dice[1, 1, 2] = 0.6  # class 1: weighting 1 at 0.6
    dice[2, 0, 0] = 0.55  # class 2: a threshold alone
    dice[2, 2, 0] = 0.5505  # ... and a weighting hardly better than it
    k, g, before, thr, after = choose_weights(dice, grid, min_gain=1e-3)
    assert k.tolist() == [0, 1, 0] and g.tolist() == [1, 2, 0]
    assert before.per_class.tolist() == [0.5, 0.5, 0.5]
    assert thr.per_class.tolist() == [0.5, 0.5, 0.55]
    assert after.per_class.tolist() == [0.5, 0.6, 0.55]


def test_tuning_never_lowers_oof_dice_across_oof_sizes(trained, tiny_root, tmp_path, capsys):
    cfg, work = trained
    members = ensemble_members(cfg)
    assert {m.run.experiment for m in members} == {"tiny", "fcn"}
    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_ensemble as script

    out = tmp_path / "w.json"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--quiet", "--out", str(out)]
    assert script.main(args + tiny_overrides(tiny_root, work, **_overrides())) == 0
    printed = capsys.readouterr().out
    assert "w+thr" in printed and "weights + thresholds" in printed
    for step in ("0.3", "0", "0.0001"):  # a user's mistake: one line, exit code 2
        bad = ["--step", step]
        assert script.main(args + bad + tiny_overrides(tiny_root, work, **_overrides())) == 2
        err = capsys.readouterr().err.strip()
        assert "step=" in err and len(err.splitlines()) == 1, err

    res, path = tune_ensemble(cfg, members, out=tmp_path / "again.json", progress=False)
    assert res.after.n_images == 2 and res.experiments == ["tiny", "fcn"]
    assert (res.after.per_class >= res.thresholds_only.per_class).all()
    assert (res.thresholds_only.per_class >= res.before.per_class).all()
    assert res.after.mean >= res.before.mean
    # "before" is what inference did so far: configured (uniform) weights at 0.5.
    assert res.candidates[0].tolist() == [0.5, 0.5]
    dice, _ = grid_dice(oof_items(members, tiny_root, progress=False), (0.5,))
    np.testing.assert_allclose(res.before.per_class, dice[:, 0], atol=1e-9)
    # Every chosen weighting is on the grid: shares >= min_share summing to 1.
    assert np.allclose(res.weights.sum(1), 1) and res.weights.min() >= 0.1 - 1e-12
    table = read_class_weights(path)
    assert table == res.class_weights and set(table) == {"tiny", "fcn"}
    assert json.loads(path.read_text())["thresholds"] == res.thresholds
    assert json.loads(out.read_text())["class_weights"] == table  # the script: same choice


# --------------------------------------------------------------------------- inference
def test_inference_applies_the_tuned_weights_and_thresholds(trained):
    cfg, _ = trained
    members = ensemble_members(cfg)
    res, path = tune_ensemble(cfg, members, progress=False)  # the default file of infer.name
    try:
        assert path == thresholds_path(cfg)
        sub = predict_submission(cfg, members, path.parent / "s.csv", progress=False)
        assert sub.report.ok
        assert sub.class_weights == res.class_weights and str(path) in sub.weights_from
        assert sub.thresholds == res.thresholds and sub.thresholds_from == str(path)
    finally:
        path.unlink()
    plain = predict_submission(cfg, members, path.parent / "p.csv", progress=False)
    assert plain.class_weights is None and "scalar" in plain.weights_from


@pytest.mark.parametrize("tta", [["none"], ["none", "hflip"]])
def test_one_hot_weights_reproduce_single_members_byte_for_byte(trained, tmp_path, tta):
    cfg, work = trained
    ckpt = {e: work / "runs" / e / "fold0" / "best.pt" for e in EXPERIMENTS}
    # Low thresholds so that these barely trained models draw masks to compare.
    plain = write_thresholds(tmp_path / "plain.json", [0.2] * C)
    lines = {}
    with _infer(cfg, tta=tta, thresholds=str(plain)):
        for e, p in ckpt.items():
            sub = predict_submission(
                cfg, ensemble_members(cfg, explicit=[p]), tmp_path / f"{e}.csv", progress=False
            )
            lines[e] = sub.path.read_bytes().splitlines(keepends=True)
    assert lines["tiny"] != lines["fcn"]
    for e in EXPERIMENTS:  # both members draw masks, so the comparison can fail
        assert any(r.strip().split(b",")[-1] for r in lines[e][1:]), e

    both = ensemble_members(cfg)
    for name, pick in {
        "all tiny": lambda c: "tiny",
        "split": lambda c: ("tiny", "fcn")[c % 2],
    }.items():
        table = {e: [float(pick(c) == e) for c in range(C)] for e in EXPERIMENTS}
        f = write_thresholds(tmp_path / f"{name}.json", [0.2] * C, class_weights=table)
        with _infer(cfg, tta=tta, thresholds=str(f)):
            sub = predict_submission(cfg, both, tmp_path / f"{name}.csv", progress=False)
        assert sub.class_weights == table
        got = sub.path.read_bytes().splitlines(keepends=True)
        want = [lines["tiny"][0]] + [
            lines[pick(i % C)][1 + i] for i in range(len(lines["tiny"]) - 1)
        ]
        assert got == want, name


def test_weights_tuned_for_other_experiments_are_refused(trained, tmp_path):
    cfg, _ = trained
    table = {"tiny": [1.0] * C, "other": [1.0] * C}
    f = write_thresholds(tmp_path / "w.json", [0.5] * C, class_weights=table)
    with (
        _infer(cfg, thresholds=str(f)),
        pytest.raises(RunError, match=r"w\.json.*\['other', 'tiny'\].*\['fcn', 'tiny'\]"),
    ):
        predict_submission(cfg, ensemble_members(cfg), tmp_path / "s.csv", progress=False)
    bad = write_thresholds(tmp_path / "bad.json", [0.5] * C, class_weights={"tiny": [1.0] * 3})
    with pytest.raises(RunError, match=r"bad\.json.*29 weights"):
        read_class_weights(bad)
    text = write_thresholds(tmp_path / "t.json", [0.5] * C, class_weights={"tiny": ["x"] * C})
    with pytest.raises(RunError, match=r"t\.json.*numbers"):
        read_class_weights(text)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(RunError, match=r"list\.json"):
        read_class_weights(tmp_path / "list.json")


def test_an_experiments_folds_share_its_weight(trained, tmp_path):
    """Tuning sees one fold per experiment on each OOF image, so inference must give each
    experiment its weight whatever its number of folds (3 folds of A vs 1 of B: 50/50)."""
    cfg, _ = trained
    members = [
        MemberSpec(tmp_path / e / f"fold{k}" / "best.pt", w)
        for e, k, w in (("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0), ("b", 0, 2.0))
    ]

    def shares(weights) -> dict[str, torch.Tensor]:
        w = torch.stack([torch.as_tensor(x, dtype=torch.float64).expand(C) for x in weights])
        w = w / w.sum(0)
        out = {"a": torch.zeros(C, dtype=torch.float64), "b": torch.zeros(C, dtype=torch.float64)}
        for m, row in zip(members, w, strict=True):
            out[m.run.experiment] += row
        return out

    with _infer(cfg, thresholds=str(tmp_path / "none.json")):
        weights, table, _ = resolve_class_weights(cfg, members)
    got = shares(weights)
    assert table is None
    torch.testing.assert_close(got["a"], torch.full((C,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(got["b"], torch.full((C,), 2 / 3, dtype=torch.float64))
    cw = {"a": [0.25] * C, "b": [0.75] * C}
    f = write_thresholds(tmp_path / "cw.json", [0.5] * C, class_weights=cw)
    with _infer(cfg, thresholds=str(f)):
        weights, table, _ = resolve_class_weights(cfg, members)
    got = shares(weights)
    torch.testing.assert_close(got["a"], torch.full((C,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(got["b"], torch.full((C,), 0.75, dtype=torch.float64))


def test_ensemble_report_scores_with_the_tuned_class_weights(trained, tmp_path):
    """The report's after-tuning OOF Dice is the one tune_ensemble chose (weights and
    thresholds together), not the thresholds applied to uniform weights."""
    from bonecomp.report import write_ensemble_report

    cfg, _ = trained
    members = ensemble_members(cfg)
    res, path = tune_ensemble(cfg, members, out=tmp_path / "cw.json", progress=False)
    with _infer(cfg, thresholds=str(path)):
        html = write_ensemble_report(cfg, out=tmp_path / "r.html").read_text()
    after = re.search(r"mean OOF Dice ([0-9.]+) &rarr; <b>([0-9.]+)</b>", html)
    assert after, "no threshold section"
    assert float(after.group(2)) == pytest.approx(res.after.mean, abs=1e-4)
    assert "class-wise weighted" in html and "per class (tuned)" in html


# ---------------------------------------------------------------------------- Ensemble
class _Constant(nn.Module):
    """Logits ``value`` everywhere, whatever the image."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:]).clone()


def test_ensemble_normalises_class_weights_per_class():
    a, b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, -2.0, 0.5])
    wa, wb = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 1.0])
    ens = Ensemble(
        [Member("a", _Constant(a), 8, wa), Member("b", _Constant(b), 8, wb)], views(["none"], [1.0])
    )
    out = ens({8: torch.zeros(1, 3, 8, 8)})
    want = (torch.sigmoid(a) * wa + torch.sigmoid(b) * wb) / (wa + wb)
    assert not ens.single_view
    torch.testing.assert_close(out[0, :, 0, 0], want)
    # One member per class and one view: that member's logits, exactly.
    oh = Ensemble(
        [Member("a", _Constant(a), 8, torch.tensor([1.0, 0, 1])),
         Member("b", _Constant(b), 8, torch.tensor([0.0, 1, 0]))],
        views(["none"], [1.0]),
    )  # fmt: skip
    assert oh.single_view
    assert oh({8: torch.zeros(1, 3, 8, 8)})[0, :, 0, 0].tolist() == [0.0, -2.0, -1.0]
    for w, msg in ((torch.tensor([1.0, -1, 1]), ">= 0"), (torch.tensor([0.0, 0, 1]), "no weight")):
        members = [
            Member("a", _Constant(a), 8, w),
            Member("b", _Constant(b), 8, torch.tensor([0.0, 0, 1])),
        ]
        with pytest.raises(ValueError, match=msg):
            Ensemble(members, views(["none"], [1.0]))


def test_the_member_weights_of_infer_ensemble_weigh_its_probabilities(trained, tiny_root):
    """infer.ensemble with weights 3 (tiny) and 1 (fcn), as a user writes it: the
    probabilities inference thresholds are (3 sigmoid(tiny) + sigmoid(fcn)) / 4, each
    model run here by hand on the test PNG resized with INTER_AREA."""
    import cv2

    from bonecomp.data.dataset import to_float_image
    from bonecomp.data.images import read_image
    from bonecomp.data.layout import discover
    from bonecomp.inference.ensemble import load_member
    from bonecomp.inference.predict import build_ensemble, predicted_batches

    _, work = trained
    weighted = [{**ENSEMBLE[0], "weight": 3.0}, {**ENSEMBLE[1], "weight": 1.0}]
    keys = {"infer.ensemble": weighted, "infer.tta": ["none"], "infer.name": "weighted"}
    cfg = tiny_config(tiny_root, work, **_overrides(**keys))
    members = ensemble_members(cfg)
    ens, table, _ = build_ensemble(cfg, members, torch.device("cpu"))
    assert table is None  # no class weights file: the scalar weights
    test = discover(tiny_root, "test")
    got = torch.cat([p for _, p in predicted_batches(ens, test, ens.inputs, cfg,
                                                     torch.device("cpu"), "t", False)])  # fmt: skip
    pngs = [read_image(p) for p in test["image_path"]]
    x = to_float_image(torch.from_numpy(np.stack(
        [cv2.resize(p, (64, 64), interpolation=cv2.INTER_AREA) for p in pngs])))  # fmt: skip
    with torch.no_grad():
        tiny, fcn = (torch.sigmoid(load_member(m.checkpoint).model.eval()(x)) for m in members)
    torch.testing.assert_close(got, (3 * tiny + fcn) / 4, atol=1e-5, rtol=1e-5)
    assert (tiny - fcn).abs().max() > 0.05  # the weights matter: the test can fail
