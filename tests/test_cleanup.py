"""Per-class clean-up: the rules on a phantom bone with a planted island, only the classes
a table names, the choice on hand-made OOF maps (a rule kept only where it gains), the
thresholds file's table refused when bad, and inference applying exactly the table."""

from __future__ import annotations

import json
import shutil
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from bonecomp.checks import check_config
from bonecomp.classes import CLASSES
from bonecomp.config import ConfigError
from bonecomp.data.annotations import load_annotation
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.inference.cleanup import (
    FILL,
    LARGEST,
    Cleanup,
    Rule,
    candidates,
    choose_cleanup,
    cleanup_dice,
    parse_rule,
    read_cleanup,
    tune_cleanup,
)
from bonecomp.inference.postprocess import SparseMasks, trim
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.thresholds import grid_dice, write_thresholds
from bonecomp.runs import RunError, ensemble_members
from bonecomp.testing import (
    REPO,
    classic_decode,
    classic_encode,
    dense_truth,
    tiny_config,
    tiny_overrides,
)
from bonecomp.training import run_training
from tests.test_extending import _module_source

C = len(CLASSES)
EIGHT = np.ones((3, 3), bool)  # 8-connectivity for scipy's labelling (the reference)


def _sparse(dense: np.ndarray) -> SparseMasks:
    """(C, H, W) bool -> the box-per-class masks inference carries."""
    return SparseMasks(dense.shape[1:], [trim(m, 0, 0) for m in dense])


def _largest_reference(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component, by scipy on the whole image."""
    labels, n = ndimage.label(mask, EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


@pytest.fixture(scope="module")
def bones(tiny_root):
    """A phantom image's truth (C, H, W) bool and a class drawn as one component."""
    row = discover(tiny_root, "train").head(1)
    polys = load_annotation(row["json_path"].iloc[0])
    hw = next(iter(png_shapes(row).values()))
    truth = dense_truth(polys, hw).astype(bool)
    c = next(c for c in range(C) if ndimage.label(truth[c], EIGHT)[1] == 1)
    return truth, c


def _island(truth: np.ndarray, c: int, side: int = 3) -> tuple[slice, slice]:
    """A ``side``-pixel square at least 3 pixels away from class ``c``'s bone."""
    far = ndimage.distance_transform_edt(~truth[c]) > side + 3
    ys, xs = np.nonzero(far[: -side - 1, : -side - 1])
    y, x = int(ys[0]), int(xs[0])
    return slice(y, y + side), slice(x, x + side)


# ---------------------------------------------------------------------------- rules
def test_rules_remove_a_planted_island_and_keep_the_real_bone(bones):
    truth, c = bones
    pred = truth.copy()
    pred[c][_island(truth, c)] = True
    assert pred[c].sum() == truth[c].sum() + 9
    for rules in ((LARGEST,), (Rule.make("min_area", 10),), (LARGEST, FILL)):
        out = Cleanup({c: rules})(_sparse(pred)).dense().numpy()
        np.testing.assert_array_equal(out[c], truth[c], err_msg=str(rules))
    # An area above the bone's removes the bone too: the rule is what it says.
    big = Rule.make("min_area", int(truth[c].sum()) + 1)
    assert not Cleanup({c: (big,)})(_sparse(pred)).dense()[c].any()
    # A hole punched into the bone is filled back, nothing else changes.
    holed = truth.copy()
    ys, xs = np.nonzero(ndimage.binary_erosion(truth[c], iterations=2))
    holed[c, ys[len(ys) // 2], xs[len(xs) // 2]] = False
    out = Cleanup({c: (FILL,)})(_sparse(holed)).dense().numpy()
    np.testing.assert_array_equal(out[c], truth[c])


def test_the_box_gives_what_the_whole_image_gives():
    """Components and holes of a class's crop are those of the full image, also where the
    mask touches the image's edge (background open to the edge is not a hole)."""
    rng = np.random.default_rng(0)
    for seed in range(20):
        m = ndimage.binary_opening(rng.random((48, 56)) > 0.45)
        m[:, :3] = m[:, :3] | (seed % 2 == 0)  # sometimes a wall along the left edge
        if not m.any():
            continue
        dense = np.zeros((C, 48, 56), bool)
        dense[0] = m
        got = Cleanup({0: (LARGEST,)})(_sparse(dense)).dense().numpy()[0]
        np.testing.assert_array_equal(got, _largest_reference(m), err_msg=f"largest {seed}")
        got = Cleanup({0: (FILL,)})(_sparse(dense)).dense().numpy()[0]
        np.testing.assert_array_equal(got, ndimage.binary_fill_holes(m), err_msg=f"fill {seed}")


def test_only_the_classes_the_table_names_are_cleaned(bones):
    truth, _ = bones
    pred = truth.copy()
    for c in range(C):
        if truth[c].any():
            pred[c][_island(truth, c)] = True
    named = {CLASSES[3]: ["largest"], CLASSES[10]: ["min_area:20", "fill_holes"]}
    out = Cleanup.from_table(named)(_sparse(pred)).dense().numpy()
    for c in range(C):
        want = _largest_reference(pred[c]) if CLASSES[c] in named else pred[c]
        np.testing.assert_array_equal(out[c], want, err_msg=CLASSES[c])
    assert (out != pred).any()  # something was removed: the comparison can fail


def test_unknown_rules_are_refused():
    assert parse_rule("min_area:12") == Rule.make("min_area", 12)
    for bad in ("biggest", 5, None):
        with pytest.raises(ConfigError) as e:
            parse_rule(bad, "cleanup.Lunate")
        assert str(e.value) == (
            f"cleanup.Lunate: unknown clean-up rule {bad!r}; valid: largest, min_area, fill_holes"
        )
    for bad in ("min_area", "min_area:0", "min_area:-3"):
        with pytest.raises(ValueError, match=r"'min_area' is written min_area:<pixels>"):
            parse_rule(bad)
    with pytest.raises(ValueError, match=r"'largest' takes no argument, got 'largest:2'"):
        parse_rule("largest:2")


# --------------------------------------------------------------------------- tuning
S, H = 32, 64  # OOF maps at 32 px of 64 px images: bilinear x2 keeps block edges exact


def _block(y: int, x: int, h: int, w: int) -> np.ndarray:
    a = np.zeros((S, S), bool)
    a[y : y + h, x : x + w] = True
    return a


def _oof_items(n: int = 3):
    """Hand-made OOF images: every class predicted as its truth, except class 0 with a
    planted 2x2 island, class 1 whose truth is two pieces (largest would hurt), class 2
    predicted with a hole and class 3 with both. Returns the items and the expected
    per-class Dice before."""
    items, before = [], np.ones(C)
    for i in range(n):
        truth = np.zeros((C, S, S), bool)
        for c in range(C):
            truth[c] = _block(2 + (c % 5) * 5, 2 + (c // 5) * 5, 4, 4)
        truth[1] |= _block(26, 2 + i, 4, 4)  # a second, real piece
        pred = truth.copy()
        pred[0] |= _block(28, 28, 2, 2)  # the island
        pred[2] &= ~_block(3 + (2 % 5) * 5, 3, 2, 2)  # a hole inside class 2
        pred[3] |= _block(28, 24, 2, 2)  # class 3: an island and a hole
        pred[3] &= ~_block(3 + (3 % 5) * 5, 3, 2, 2)
        probs = torch.from_numpy(np.where(pred, 0.9, 0.1).astype(np.float32))
        up = np.repeat(np.repeat(truth, 2, 1), 2, 2)  # the truth at 64 px
        crops = [(0, 0, up[c].astype(np.uint8)) for c in range(C)]
        items.append((probs, crops, (H, H)))
    # By hand, at 64 px: class 0 has 64 true pixels and a 16-pixel island; class 2 a
    # 16-pixel hole in 64.
    before[0] = 2 * 64 / (64 + 80)
    before[2] = 2 * 48 / (48 + 64)
    before[3] = 2 * 48 / (64 + 64)
    return items, before


def test_tuning_keeps_a_rule_only_where_oof_dice_improves():
    items, before = _oof_items()
    combos = candidates(areas=(8, 32))
    dice, n = cleanup_dice(items, [0.5] * C, combos)
    assert n == 3
    # Scored as the thresholds tuning scores: no clean-up equals its Dice at 0.5.
    at_half, _ = grid_dice(items, (0.5,))
    np.testing.assert_allclose(dice[:, 0], at_half[:, 0])
    np.testing.assert_allclose(dice[:, 0], before, atol=1e-4)
    res = choose_cleanup(dice, combos, min_gain=1e-3)
    assert res.cleanup.table == {
        CLASSES[0]: ["largest"],
        CLASSES[2]: ["fill_holes"],
        CLASSES[3]: ["largest", "fill_holes"],
    }
    np.testing.assert_allclose(res.after.per_class, np.ones(C), atol=1e-4)
    assert res.after.per_class[1] == res.before.per_class[1]  # class 1 left alone
    k_largest = combos.index((LARGEST,))
    assert dice[1, k_largest] < dice[1, 0] - 0.1  # largest would drop the real piece
    printed = res.format()
    assert "largest" in printed.splitlines()[1] and CLASSES[0] in printed.splitlines()[1]
    # A gain under min_gain keeps nothing.
    assert choose_cleanup(dice, combos, min_gain=0.5).cleanup.table == {}


def test_a_rule_that_adds_less_than_min_gain_is_dropped():
    """(largest + fill) scores highest, but fill adds only 0.0005 to largest alone."""
    combos = candidates(areas=(8,), rules=("largest", "fill_holes"))
    assert combos == [(), (LARGEST,), (FILL,), (LARGEST, FILL)]
    dice = np.array([[0.8, 0.9, 0.8, 0.9005], [0.8, 0.9, 0.85, 0.95], [0.8, 0.8005, 0.8, 0.8]])
    res = choose_cleanup(dice, combos, min_gain=1e-3)
    assert res.pick.tolist() == [1, 3, 0]
    np.testing.assert_allclose(res.after.per_class, [0.9, 0.95, 0.8])


def test_candidates_refuse_unknown_rules():
    with pytest.raises(ConfigError, match=r"--rules.*'biggest'"):
        candidates(rules=("largest", "biggest"))
    with pytest.raises(ConfigError, match="--areas"):
        candidates(areas=(0,))


# -------------------------------------------------------------- file and inference
@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cfg = tiny_config(tiny_root, work, **{"train.epochs": 2})
    run_training(cfg, 0, progress=False)
    return cfg, work


def _rows(path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


def test_inference_applies_exactly_the_table(trained, tmp_path, tiny_root):
    """A submission with a clean-up table differs from one without exactly in the named
    classes' rows, where it holds the largest component of the plain mask."""
    cfg, _ = trained
    members = ensemble_members(cfg)
    shapes = png_shapes(discover(tiny_root, "test"))
    plain = write_thresholds(tmp_path / "plain.json", [0.2] * C)
    cfg.infer.thresholds = str(plain)
    try:
        base = predict_submission(cfg, members, tmp_path / "plain.csv", progress=False)
        rows = _rows(base.path)
        islands = {
            cls
            for img, cls, r in rows[1:]
            if ndimage.label(classic_decode(r, *shapes[img]), EIGHT)[1] > 1
        }
        named = sorted(islands, key=CLASSES.index)[:2]
        assert len(named) == 2, "too few classes with islands: the test would prove little"
        table = {name: ["largest"] for name in named}
        f = write_thresholds(tmp_path / "clean.json", [0.2] * C, cleanup=table)
        cfg.infer.thresholds = str(f)
        res = predict_submission(cfg, members, tmp_path / "clean.csv", progress=False)
    finally:
        cfg.infer.thresholds = None
    assert res.report.ok and all(name in res.cleanup_from for name in named)
    assert base.cleanup_from == "none"
    got = _rows(res.path)
    assert got[0] == rows[0] and len(got) == len(rows)
    changed = 0
    for (img, cls, r), (img2, cls2, r2) in zip(rows[1:], got[1:], strict=True):
        assert (img, cls) == (img2, cls2)
        want = r
        if cls in table:
            m = _largest_reference(classic_decode(r, *shapes[img]).astype(bool))
            want = classic_encode(m.astype(np.uint8))
        assert r2 == want, (img, cls)
        changed += r2 != r
    assert changed > 0


def _open3_reference(mask: np.ndarray) -> np.ndarray:
    """A 3x3 opening of a whole mask, background beyond the image (not the page's code)."""
    m = np.pad(mask.astype(np.uint8), 2)
    m = cv2.dilate(cv2.erode(m, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
    return m[2:-2, 2:-2].astype(bool)


def test_inference_applies_the_pages_registered_rule(trained, tmp_path, tiny_root, registries):
    """docs/extending.md's ``open3``, from the module a recipe names under ``extensions``:
    the submission whose thresholds file names it holds exactly the opened masks."""
    cfg, _ = trained
    module = tmp_path / "my_extensions.py"
    module.write_text(_module_source())
    check_config(cfg.model_copy(update={"extensions": [str(module)]}), training=False)
    members = ensemble_members(cfg)
    shapes = png_shapes(discover(tiny_root, "test"))
    table = {name: ["open3"] for name in CLASSES}
    try:
        cfg.infer.thresholds = str(write_thresholds(tmp_path / "plain.json", [0.2] * C))
        base = predict_submission(cfg, members, tmp_path / "plain.csv", progress=False)
        f = write_thresholds(tmp_path / "clean.json", [0.2] * C, cleanup=table)
        cfg.infer.thresholds = str(f)
        res = predict_submission(cfg, members, tmp_path / "clean.csv", progress=False)
    finally:
        cfg.infer.thresholds = None
    assert res.report.ok and "open3" in res.cleanup_from
    changed = 0
    for (img, cls, r), (img2, cls2, r2) in zip(
        _rows(base.path)[1:], _rows(res.path)[1:], strict=True
    ):
        assert (img, cls) == (img2, cls2)
        want = _open3_reference(classic_decode(r, *shapes[img]))
        np.testing.assert_array_equal(classic_decode(r2, *shapes[img]).astype(bool), want)
        changed += r2 != r
    assert changed > 0, "open3 changed no mask: the test would prove little"


def test_bad_tables_are_refused_in_one_line(trained, tmp_path, capsys):
    cfg, work = trained
    sys.path.insert(0, str(REPO / "scripts"))
    import infer as script

    cases = {
        "rule": ({CLASSES[0]: ["biggest"]}, rf"cleanup\.{CLASSES[0]}: unknown clean-up rule"),
        "class": ({"Femur": ["largest"]}, r"cleanup names \['Femur'\].*other classes"),
    }
    for name, (table, msg) in cases.items():
        f = write_thresholds(tmp_path / f"{name}.json", [0.5] * C, cleanup=table)
        with pytest.raises(RunError, match=msg):
            read_cleanup(f)
        args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
        over = tiny_overrides(cfg.data.root, work, **{"infer.thresholds": str(f)})
        assert script.main([*args, "--out", str(tmp_path / "s.csv"), *over]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{name}.json" in err and "cleanup" in err, err
        assert not (tmp_path / "s.csv").exists()
    doc = json.loads(write_thresholds(tmp_path / "ok.json", [0.5] * C).read_text())
    doc["classes"] = doc["classes"][::-1]
    doc["cleanup"] = {CLASSES[0]: ["largest"]}
    (tmp_path / "rev.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match=r"rev\.json.*other classes"):
        read_cleanup(tmp_path / "rev.json")


def test_tuning_script_keeps_the_file_and_adds_the_table(trained, tmp_path, capsys):
    cfg, work = trained
    sys.path.insert(0, str(REPO / "scripts"))
    import tune_cleanup as script

    src = write_thresholds(tmp_path / "thr.json", [0.3] * C, grid=[0.3])
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet", "--areas", "4", "16"]
    over = tiny_overrides(cfg.data.root, work, **{"infer.thresholds": str(src)})
    out = tmp_path / "out.json"
    assert script.main([*args, "--out", str(out), *over]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and CLASSES[0] in printed
    doc = json.loads(out.read_text())
    assert doc["thresholds"] == [0.3] * C and doc["grid"] == [0.3]  # the rest is kept
    assert (
        isinstance(doc["cleanup"], dict) and doc["cleanup_dice_after"] >= doc["cleanup_dice_before"]
    )
    read_cleanup(out)  # what it wrote reads back
    assert script.main([*args, "--rules", "biggest", *over]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rules" in err and "biggest" in err, err
    # The library call, with the same thresholds file, makes the same choice.
    cfg.infer.thresholds = str(src)
    try:
        res, _ = tune_cleanup(cfg, ensemble_members(cfg), (4, 16), out=tmp_path / "b.json")
    finally:
        cfg.infer.thresholds = None
    assert res.cleanup.table == doc["cleanup"]
    assert res.before.mean == pytest.approx(doc["cleanup_dice_before"])


RADIUS, ULNA = CLASSES.index("Radius"), CLASSES.index("Ulna")


def _hand_run(trained_work, tiny_root, runs, name: str, island: float):
    """A run folder ``runs/<name>/fold0`` whose OOF maps are made by hand on the trained
    run's validation images: each bone at 0.02 + 0.9 x its coverage, and a 12 px island
    at p = ``island`` in a corner beside the Radius and the Ulna. Returns its folder."""
    src, run = trained_work / "runs" / "tiny" / "fold0", runs / name / "fold0"
    run.mkdir(parents=True)
    shutil.copy(src / "oof_index.csv", run)
    (run / "best.pt").symlink_to(src / "best.pt")  # tuning reads only the OOF maps
    index = pd.read_csv(run / "oof_index.csv")
    s = 32
    maps = np.zeros((len(index), C, s, s), np.float16)
    for row, rel, h, w in zip(index["row"], index["rel"], index["src_h"], index["src_w"],
                              strict=True):  # fmt: skip
        truth = dense_truth(load_annotation(tiny_root / "train" / "outputs_json" /
                                            rel.replace(".png", ".json")), (h, w))  # fmt: skip
        cover = np.stack([cv2.resize(t.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA)
                          for t in truth])  # fmt: skip
        maps[row] = 0.02 + 0.9 * cover
        for c in (RADIUS, ULNA):
            assert cover[c, :6, :6].max() == 0  # the island is far from the bone
            maps[row, c, 1:4, 1:4] = island
    np.save(run / "oof.npy", maps)
    return run


def _tune_cleanup(
    tiny_root, work, thresholds_file, experiments, capsys, rules: list[str] | None = None
) -> dict:
    """``tune_cleanup.py --rules largest`` (or, with ``rules``, no ``--rules`` and
    ``infer.cleanup_rules=rules``) with the thresholds file and an ensemble of
    ``experiments`` set as a user sets them; the clean-up table it writes."""
    sys.path.insert(0, str(REPO / "scripts"))
    import tune_cleanup as script

    keys = {"infer.ensemble": [{"experiment": e, "folds": [0]} for e in experiments],
            "infer.thresholds": str(thresholds_file)}  # fmt: skip
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
    if rules is None:
        args += ["--rules", "largest"]
    else:
        keys["infer.cleanup_rules"] = rules
    out = work / "out.json"
    over = tiny_overrides(tiny_root, work, **keys)
    assert script.main([*args, "--out", str(out), *over]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())["cleanup"]


def test_the_clean_up_is_chosen_on_the_masks_of_the_thresholds_in_use(
    trained, tiny_root, tmp_path, capsys
):
    """Hand-made OOF maps with an island at p = 0.3 beside the Radius and the Ulna. The
    thresholds file (as ``tune_thresholds.py`` writes it) gives the Radius 0.2 and every
    other class 0.5: only the Radius's masks hold its island, so ``tune_cleanup.py``
    keeps ``largest`` for the Radius alone. At 0.5 for every class it would keep nothing."""
    _, work = trained
    run = _hand_run(work, tiny_root, tmp_path / "runs", "hand", 0.3)
    ts = [0.5] * C
    ts[RADIUS] = 0.2
    thr = write_thresholds(tmp_path / "thr.json", ts, grid=[0.2, 0.5], oof_images=2,
                           runs=[str(run)])  # fmt: skip
    assert _tune_cleanup(tiny_root, tmp_path, thr, ["hand"], capsys) == {"Radius": ["largest"]}


def test_the_clean_up_is_chosen_on_the_maps_of_the_class_weights_in_use(
    trained, tiny_root, tmp_path, capsys
):
    """Two experiments' hand-made OOF maps, islands at p = 0.6 in ``a`` and none in ``b``.
    The class weights of the thresholds file (as ``tune_ensemble.py`` writes them) give
    the Radius 0.9 of ``a`` (an island of 0.54: seen at 0.5) and the Ulna 0.1 of ``a``
    (0.06: unseen): ``largest`` for the Radius alone. With the members' own weights (1
    and 1) both islands would be 0.3: unseen, no clean-up."""
    _, work = trained
    runs = [_hand_run(work, tiny_root, tmp_path / "runs", e, p) for e, p in (("a", 0.6), ("b", 0))]
    share = [0.5] * C
    share[RADIUS], share[ULNA] = 0.9, 0.1
    table = {"a": share, "b": [1 - w for w in share]}
    thr = write_thresholds(tmp_path / "thr.json", [0.5] * C, class_weights=table,
                           runs=[str(r) for r in runs])  # fmt: skip
    assert _tune_cleanup(tiny_root, tmp_path, thr, ["a", "b"], capsys) == {"Radius": ["largest"]}


@pytest.mark.parametrize(("rules", "kept"), [
    (["largest"], {"Radius": ["largest"], "Ulna": ["largest"]}),
    (["fill_holes"], {}),
])  # fmt: skip
def test_infer_cleanup_rules_are_the_kinds_the_tuning_tries(
    trained, tiny_root, tmp_path, capsys, rules, kept
):
    """``infer.cleanup_rules`` set as a user sets it (no ``--rules``) is what
    ``tune_cleanup.py`` tries: hand-made OOF maps with an island at p = 0.6 beside the
    Radius and the Ulna keep ``largest`` for both when it may try it, and nothing when it
    may only fill holes (which never removes an island)."""
    _, work = trained
    run = _hand_run(work, tiny_root, tmp_path / "runs", "hand", 0.6)
    thr = write_thresholds(tmp_path / "thr.json", [0.5] * C, runs=[str(run)])
    assert _tune_cleanup(tiny_root, tmp_path, thr, ["hand"], capsys, rules=rules) == kept
