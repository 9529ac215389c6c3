"""The post-processing file (``bonecomp.inference.postfile``): one reader and writer;
a round trip; each bad file refused in one line naming it; re-tuning keeps the parts
still valid and says in one line what it dropped."""

from __future__ import annotations

import json
import math
import sys

import pytest

from bonecomp.classes import CLASSES
from bonecomp.inference.postfile import PostFile, retuned
from bonecomp.inference.thresholds import write_thresholds
from bonecomp.runs import RunError
from bonecomp.testing import tiny_overrides
from tests.conftest import REPO
from tests.test_cleanup import _hand_run, trained  # noqa: F401 (a fixture)

C = len(CLASSES)


def _full() -> PostFile:
    return PostFile(
        [0.4] * C,
        runs=["runs/a/fold0", "runs/b/fold0"],
        class_weights={"a": [0.25] * C, "b": [0.75] * C},
        info={"grid": [0.4, 0.5], "oof_images": 3, "dice_after": 0.9},
    ).with_cleanup({"Radius": ["largest", "min_area:64"]}, ["runs/a/fold0", "runs/b/fold0"],
                   cleanup_min_gain=0.001)  # fmt: skip


def test_round_trip(tmp_path):
    post = _full()
    back = PostFile.read(post.write(tmp_path / "thr.json"))
    assert back == post
    assert back.basis_of_cleanup() == (
        [0.4] * C, {"a": [0.25] * C, "b": [0.75] * C}, {"a/fold0", "b/fold0"}
    )  # fmt: skip


def test_a_file_of_the_current_code_loads_its_clean_up_tuned_at_its_own_thresholds(tmp_path):
    """Files written before the clean-up recorded its basis: it is the file's own."""
    doc = {"classes": list(CLASSES), "thresholds": [0.3] * C, "grid": [0.3], "oof_images": 2,
           "runs": ["runs/a/fold0"], "cleanup": {"Ulna": ["fill_holes"]},
           "cleanup_min_gain": 0.001, "cleanup_dice_after": 0.5}  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(doc, indent=1))
    post = PostFile.read(tmp_path / "old.json")
    assert post.thresholds == [0.3] * C and post.cleanup == {"Ulna": ["fill_holes"]}
    assert post.info["grid"] == [0.3] and post.info["cleanup_dice_after"] == 0.5
    assert post.basis_of_cleanup() == ([0.3] * C, None, {"a/fold0"})


def _bad_cases() -> dict[str, tuple[object, str]]:
    ok = {"classes": list(CLASSES), "thresholds": [0.5] * C}
    return {
        "missing": (None, "cannot read"),
        "not_json": ("{thresholds: 0.5", "cannot read"),
        "key_twice": ('{"thresholds": [], "thresholds": []}', "given twice"),
        "a_list": ([0.5] * C, "not a JSON object"),
        "classes": ({**ok, "classes": list(CLASSES)[:-1]}, "classes"),
        "count": ({**ok, "thresholds": [0.5] * (C - 1)}, f"{C - 1} thresholds for {C} classes"),
        "nan": ({**ok, "thresholds": [math.nan] * C}, "thresholds must be in"),
        "type": ({**ok, "thresholds": ["0.5"] * C}, "bad thresholds"),
        "no_thresholds": ({"classes": list(CLASSES)}, "bad thresholds"),
        "runs": ({**ok, "runs": "runs/a/fold0"}, "runs must be a list"),
        "weights_count": ({**ok, "class_weights": {"a": [1.0] * 3}}, f"{C} weights each"),
        "weights_inf": ({**ok, "class_weights": {"a": [math.inf] * C}}, "weights >= 0"),
        "weights_type": ({**ok, "class_weights": {"a": ["x"] * C}}, "numbers each"),
        "cleanup_rule": ({**ok, "cleanup": {"Radius": ["biggest"]}}, "unknown clean-up rule"),
        "cleanup_class": ({**ok, "cleanup": {"Femur": ["largest"]}}, "other classes"),
        "cleanup_basis": (
            {**ok, "cleanup": {}, "cleanup_thresholds": [2.0] * C},
            "bad cleanup_thresholds",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_each_bad_file_is_one_line_naming_it(case, tmp_path):
    content, problem = _bad_cases()[case]
    path = tmp_path / f"{case}.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(RunError) as e:
        PostFile.read(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"{case}.json" in msg and problem in msg, msg


def test_retuning_keeps_a_clean_up_only_at_the_thresholds_weights_and_models_it_was_tuned_at():
    old = _full()
    runs, weights = old.runs, old.class_weights
    same, note = retuned(old, "thr.json", [0.4] * C, runs=runs, class_weights=weights, grid=[0.4])
    assert same.cleanup == old.cleanup and same.info["cleanup_min_gain"] == 0.001
    assert same.info["grid"] == [0.4] and "oof_images" not in same.info  # the new records
    assert (
        note == "thr.json: kept its clean-up (tuned at these thresholds, class weights and models)"
    )
    moved = [r.replace("runs/", "/elsewhere/runs/") for r in runs]  # the same models
    assert retuned(old, "t", [0.4] * C, runs=moved, class_weights=weights)[0].cleanup
    cases = {
        "thresholds": ([0.45] * C, runs, weights),
        "models": ([0.4] * C, ["runs/a/fold1", "runs/b/fold0"], weights),
        "class weights": ([0.4] * C, runs, {"a": [0.5] * C, "b": [0.5] * C}),
    }
    for what, (ts, rs, ws) in cases.items():
        new, note = retuned(old, "thr.json", ts, runs=rs, class_weights=ws)
        assert new.cleanup is None and not [k for k in new.info if k.startswith("cleanup")]
        assert note == (f"thr.json: dropped its clean-up (tuned at other {what}; "
                        "re-tune it with scripts/tune_cleanup.py)"), note  # fmt: skip
    # thresholds alone (tune_thresholds): the old class weights go too, said in the line
    new, note = retuned(old, "thr.json", [0.4] * C, runs=runs)
    assert new.class_weights is None and new.cleanup is None
    assert note.startswith("thr.json: dropped its class weights (tuned together with the old")
    assert "and its clean-up (tuned at other class weights;" in note and len(note.splitlines()) == 1
    assert retuned(None, "thr.json", [0.4] * C, runs=runs) == (PostFile([0.4] * C, runs), "")


def _script(name: str):
    sys.path.insert(0, str(REPO / "scripts"))
    return __import__(name)


def test_retuning_thresholds_after_a_clean_up_says_what_happened_to_it(
    trained,  # noqa: F811 (the fixture)
    tiny_root,
    tmp_path,
    capsys,
):
    """As a user acts: tune_thresholds.py, tune_cleanup.py into the same file, then
    tune_thresholds.py again. At the same thresholds (and models) the clean-up is kept;
    at other thresholds it is dropped, in one printed line naming the file."""
    _, work = trained
    run = _hand_run(work, tiny_root, tmp_path / "runs", "hand", 0.6)  # islands at p = 0.6
    thr = tmp_path / "thr.json"
    keys = {"infer.ensemble": [{"experiment": "hand", "folds": [0]}],
            "infer.thresholds": str(thr), "infer.cleanup_rules": ["largest"]}  # fmt: skip
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
    over = tiny_overrides(tiny_root, tmp_path, **keys)
    tune_thresholds, tune_cleanup = _script("tune_thresholds"), _script("tune_cleanup")

    def thresholds(*grid: str) -> str:
        assert tune_thresholds.main([*args, "--grid", *grid, "--out", str(thr), *over]) == 0
        return capsys.readouterr().out

    assert "clean-up" not in thresholds("0.5")  # a new file: nothing kept or dropped
    assert tune_cleanup.main([*args, *over]) == 0, capsys.readouterr().err
    capsys.readouterr()
    cleaned = PostFile.read(thr)
    assert cleaned.cleanup == {"Radius": ["largest"], "Ulna": ["largest"]}
    assert cleaned.runs == [str(run)]

    printed = thresholds("0.5")  # the same thresholds again: the clean-up still fits
    assert f"{thr}: kept its clean-up (tuned at these thresholds" in printed
    assert PostFile.read(thr).cleanup == cleaned.cleanup

    printed = thresholds("0.5", "0.61")  # 0.61 hides the islands: other thresholds
    post = PostFile.read(thr)
    assert post.thresholds != cleaned.thresholds, "the thresholds did not change: proves little"
    line = f"{thr}: dropped its clean-up (tuned at other thresholds; re-tune it with "
    assert [x for x in printed.splitlines() if "clean-up" in x] == [
        line + "scripts/tune_cleanup.py)"
    ]
    assert post.cleanup is None and "cleanup" not in json.loads(thr.read_text())
    assert not any(k.startswith("cleanup") for k in json.loads(thr.read_text()))


def test_a_damaged_file_to_retune_is_one_line_before_any_work(trained, tmp_path, capsys):  # noqa: F811
    cfg, work = trained
    bad = write_thresholds(tmp_path / "bad.json", [0.5] * (C - 1))
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet", "--out", str(bad)]
    assert _script("tune_thresholds").main(args + tiny_overrides(cfg.data.root, work)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err and "thresholds for" in err, err
    assert len(json.loads(bad.read_text())["thresholds"]) == C - 1  # left as it was
