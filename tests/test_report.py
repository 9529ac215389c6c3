"""The HTML report of a tiny two-fold run: every section there and self-contained, numbers
that agree with the run's files and with threshold tuning and scoring, train.py keeping
it fresh, and (with Chromium installed) a real browser that loads it without errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonecomp import rle
from bonecomp.classes import CLASSES, NUM_CLASSES
from bonecomp.data.annotations import load_annotation
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.data.truth import GroundTruth
from bonecomp.data.wrist import wrist_angle
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.thresholds import tune_thresholds, write_thresholds
from bonecomp.report import (
    experiment_view,
    submission_angles,
    write_ensemble_report,
    write_run_report,
)
from bonecomp.runs import REPORT, ensemble_members, ensemble_report_path, run_dir
from bonecomp.submission import score_submission, write_submission
from bonecomp.testing import REPO, dense_truth, tiny_config, tiny_overrides

CHROMIUM_MISSING = (
    "no Chromium: install it with `apt-get update && apt-get install -y chromium` "
    "(Debian/Ubuntu; the system browser, nothing is downloaded by Python)"
)


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """Folds 0 and 1 trained by scripts/train.py: fold 0 with the report on (the default),
    fold 1 with train.report=false. Returns (config, experiment folder, report after fold
    0, report after fold 1)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import train as train_script

    work = tmp_path_factory.mktemp("work")
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--quiet"]
    over = tiny_overrides(tiny_root, work)
    assert train_script.main([*args, "--fold", "0", *over]) == 0
    page = work / "runs" / "tiny" / REPORT
    after_fold0 = page.read_text()
    assert train_script.main([*args, "--fold", "1", *over, "train.report=false"]) == 0
    after_fold1 = page.read_text()
    both = [{"experiment": "tiny", "folds": [0, 1]}]
    cfg = tiny_config(tiny_root, work, **{"infer.ensemble": both})
    return cfg, work / "runs" / "tiny", after_fold0, after_fold1


class Page(HTMLParser):
    """What a test needs from a report: images, CV table rows and class columns, links."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.cv_rows = 0
        self.cv_classes: list[str] = []
        self.external: list[str] = []
        self._in_cv = self._in_body = self._in_cls = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if a.get("src", "").startswith(("http", "//")) or tag == "link":
            self.external.append(a.get("src") or a.get("href", ""))
        if tag == "table" and "cv" in a.get("class", "").split():
            self._in_cv = True
        if self._in_cv and tag == "tbody":
            self._in_body = True
        if self._in_cv and self._in_body and tag == "tr":
            self.cv_rows += 1
        self._in_cls = self._in_cv and tag == "th" and a.get("class") == "cls"

    def handle_endtag(self, tag):
        if tag in ("table", "tbody"):
            self._in_body = False
            self._in_cv = self._in_cv and tag != "table"
        if tag == "th":
            self._in_cls = False

    def handle_data(self, data):
        if self._in_cls:
            self.cv_classes.append(data.strip())


def _fold_dice(experiment: Path) -> pd.DataFrame:
    return pd.DataFrame(
        {k: pd.read_csv(experiment / f"fold{k}" / "dice_per_class.csv")["dice"] for k in (0, 1)}
    ).T.set_axis(list(CLASSES), axis=1)


def test_train_writes_the_report_after_each_fold_unless_told_not_to(trained):
    _, _, after_fold0, after_fold1 = trained
    assert Page(after_fold0).cv_rows == 1  # written after fold 0 (train.report default)
    assert after_fold1 == after_fold0  # fold 1 had train.report=false: not refreshed


def test_run_report_is_self_contained_with_every_section(trained):
    _, experiment, _, _ = trained
    path = write_run_report(experiment)
    assert path == experiment / REPORT
    html = path.read_text()
    page = Page(html)
    assert page.external == []
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images)
    kinds = [i.get("class") for i in page.images]
    assert kinds.count("curves") == 2 and kinds.count("heatmap") == 1
    assert kinds.count("overlay") == 4  # the 4 worst of the 4 validation images
    assert page.cv_rows == 2 and len(page.cv_classes) == NUM_CLASSES
    # weakest classes first: the order of the mean over folds of dice_per_class.csv
    means = _fold_dice(experiment).mean(axis=0)
    assert page.cv_classes == list(means.sort_values(kind="stable").index)
    assert f"{means.mean():.4f}" in html
    assert "fold0/config.yaml" in html and "fold1/config.yaml" in html
    for key in ("python", "torch", "CUDA (torch build)", "device", "numpy", "bonecomp"):
        assert f">{key}</td>" in html
    summary = pd.read_csv(experiment / "fold0" / "summary.csv")
    assert {"loss", "val_dice", "lr"} <= set(summary.columns)


def test_cv_table_and_worst_images_follow_the_run_files(trained):
    _, experiment, _, _ = trained
    view = experiment_view(experiment, n_images=2, n_classes=3)
    dice = _fold_dice(experiment)
    assert [f for f, _, _ in view.table] == [0, 1]
    for fold, mean, values in view.table:
        np.testing.assert_allclose(values, dice.loc[fold, view.classes].to_numpy())
        assert mean == pytest.approx(dice.loc[fold].mean())
    assert len(view.worst) == 2
    # captions name the 3 weakest classes, and the worst image comes first
    assert all(all(c in p.caption for c in view.classes[:3]) for p in view.worst)
    scores = [float(re.search(r"mean Dice ([0-9.]+)", p.caption)[1]) for p in view.worst]
    assert scores == sorted(scores)
    assert view.thresholds is None  # nothing tuned yet


def test_threshold_effect_matches_the_tuning(trained, tmp_path):
    cfg, experiment, _, _ = trained
    result, tpath = tune_thresholds(cfg, ensemble_members(cfg), progress=False)
    try:
        view = experiment_view(experiment)
        t = view.thresholds
        assert t is not None and t.path == str(tpath)
        by_class = {c: (th, b, a) for c, th, b, a in t.rows}
        for c, name in enumerate(CLASSES):
            th, before, after = by_class[name]
            assert th == result.thresholds[c]
            assert before == pytest.approx(result.before.per_class[c], abs=1e-12)
            assert after == pytest.approx(result.after.per_class[c], abs=1e-12)
        assert t.recorded == pytest.approx((result.before.mean, result.after.mean))
        html = write_run_report(experiment, tmp_path / "r.html").read_text()
        assert "OOF Dice before / after" in html and f"{result.after.mean:.4f}" in html
        # the ensemble report computes the same on the ensemble's OOF probabilities
        members = write_ensemble_report(cfg, out=tmp_path / "e.html").read_text()
        assert "ensemble&#39;s weighted mean OOF" in members
        computed = re.search(r"mean OOF Dice [0-9.]+ &rarr; <b>([0-9.]+)</b>", members)
        assert computed and computed.group(1) == f"{result.after.mean:.4f}"
        # a file tuned for an ensemble of other experiments is not this experiment's
        other = {"tiny": [1.0] * len(CLASSES), "fcn": [1.0] * len(CLASSES)}
        write_thresholds(tpath, result.thresholds, runs=["x/fcn/fold0"], class_weights=other)
        assert experiment_view(experiment).thresholds is None
    finally:
        tpath.unlink()


def test_a_report_without_the_cache_reads_the_truth_from_the_json(trained, tmp_path):
    """Truth polygons come from the training cache; where it was deleted (another
    machine, a cleaned disk) the report reads the JSON and shows the same."""
    cfg, experiment, _, _ = trained
    assert GroundTruth.of(cfg.data).cache is not None  # training left one
    with_cache = experiment_view(experiment, n_images=2)
    cache = Path(cfg.data.cache_dir)
    moved = cache.rename(tmp_path / "cache-away")
    try:
        assert GroundTruth.of(cfg.data).cache is None
        without = experiment_view(experiment, n_images=2)
    finally:
        moved.rename(cache)
    assert [p.caption for p in without.worst] == [p.caption for p in with_cache.worst]
    assert [p.uri for p in without.worst] == [p.uri for p in with_cache.worst]


def test_ensemble_report_checks_and_scores_a_submission(trained, tiny_root, tmp_path):
    cfg, _, _, _ = trained
    sub = predict_submission(cfg, ensemble_members(cfg), tmp_path / "s.csv", progress=False)
    labels = tiny_root / "test_labels"
    path = write_ensemble_report(cfg, sub.path, labels)
    assert path == ensemble_report_path(cfg)
    html = path.read_text()
    table, _ = score_submission(sub.path, labels, (128, 128), progress=False)
    assert f"OK {sub.path}" in html and f"{table.mean:.4f}" in html
    assert str(run_dir(cfg, 0).best) in html and str(run_dir(cfg, 1).best) in html
    assert Page(html).cv_rows == 2
    # a broken CSV: its problems are listed, and it is not scored
    lines = sub.path.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:-1]) + "\n")
    html = write_ensemble_report(cfg, bad, labels, out=tmp_path / "bad.html").read_text()
    assert f"INVALID {bad}" in html and "rows, expected" in html
    assert "Test Dice against" not in html


def test_report_script(trained, tmp_path, capsys):
    _, experiment, _, _ = trained
    sys.path.insert(0, str(REPO / "scripts"))
    import report as report_script

    out = tmp_path / "page.html"
    assert report_script.main([str(experiment), "--out", str(out), "--images", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert [i.get("class") for i in Page(out.read_text()).images].count("overlay") == 1
    with pytest.raises(SystemExit):
        report_script.main([])  # neither an experiment nor --ensemble
    assert report_script.main([str(tmp_path / "nothing"), "--out", str(out)]) == 2
    loose = tmp_path / "ck" / "model.pt"  # a checkpoint outside runs/<experiment>/fold<k>/
    loose.parent.mkdir()
    shutil.copy(experiment / "fold0" / "best.pt", loose)
    cfg_args = ["--config", str(REPO / "configs" / "demo.yaml")]
    capsys.readouterr()
    assert report_script.main(["--ensemble", *cfg_args, "--checkpoints", str(loose)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pt" in err and "fold<k>" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------- a real browser
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_check(page: Path, profile: Path, screenshot: Path | None = None) -> dict[str, str]:
    """Load ``page`` in headless Chromium and return what its inline check script wrote
    into ``#page-check`` (images, decoded, errors, done) plus the error text."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000",
    ]  # fmt: skip
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    m = re.search(r'<div id="page-check"([^>]*)>(.*?)</div>', dom, re.S)
    assert m, f"no #page-check in the DOM Chromium returned ({len(dom)} characters)"
    found = dict(re.findall(r'data-(\w+)="([^"]*)"', m[1]))
    found["text"] = m[2]
    if screenshot:
        subprocess.run(
            [chromium(), *flags, "--hide-scrollbars", "--window-size=1280,2600",
             f"--screenshot={screenshot}", url],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    return found


@pytest.mark.skipif(chromium() is None, reason=CHROMIUM_MISSING)
def test_report_loads_in_a_real_browser(trained, tmp_path):
    _, experiment, _, _ = trained
    page = write_run_report(experiment, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    found = browser_check(page, tmp_path / "profile", shot)
    assert found["done"] == "1", "the page's load handler did not run"
    assert found["errors"] == "0", found["text"]
    n = len(Page(page.read_text()).images)
    assert int(found["images"]) == n >= 7  # 2 curves, heat map, 4 overlays
    assert found["decoded"] == found["images"]
    assert shot.stat().st_size > 10_000
    # the DOM Chromium built has the CV table: one row per fold, 29 class columns
    html = page.read_text()
    assert Page(html).cv_rows == 2 and len(Page(html).cv_classes) == NUM_CLASSES


@pytest.mark.skipif(chromium() is None, reason=CHROMIUM_MISSING)
def test_the_browser_check_sees_broken_images_and_script_errors(trained, tmp_path):
    """The check can fail: a damaged image and a throwing script are reported."""
    _, experiment, _, _ = trained
    html = write_run_report(experiment, tmp_path / "ok.html").read_text()
    head, sep, rest = html.partition("data:image/png;base64,")
    broken = head + sep + "AAAA" + rest[rest.index('"') :]  # the first image's data replaced
    broken = broken.replace("</body>", "<script>undefinedFunction();</script></body>")
    page = tmp_path / "broken.html"
    page.write_text(broken)
    found = browser_check(page, tmp_path / "profile")
    assert found["done"] == "1"
    assert int(found["decoded"]) == int(found["images"]) - 1
    assert int(found["errors"]) >= 2 and "undefinedFunction" in found["text"]


# ------------------------------------------------------------------------------ wrist angle
def _label_angles(folder: Path) -> dict[str, float]:
    """Wrist angle of every annotation JSON below ``folder`` by image file name."""
    return {
        p.with_suffix(".png").name: wrist_angle(load_annotation(p))
        for p in sorted(folder.rglob("*.json"))
    }


def test_run_report_shows_the_wrist_angles_of_each_folds_validation(trained, tiny_root, tmp_path):
    cfg, experiment, _, _ = trained
    view = experiment_view(experiment).angles
    assert view is not None and "GroupKFold by patient" in view.rule
    folds = pd.read_csv(view.path)  # the plain file: no angle column, measured from the JSON
    angles = _label_angles(tiny_root / "train" / "outputs_json")
    rows = {name: (n, counts) for name, n, counts, _, _ in view.rows}
    for k in range(cfg.data.n_splits):
        mine = [angles[Path(r).name] for r in folds.loc[folds["fold"] == k, "image"]]
        want = [sum(lo <= abs(a) < hi for a in mine) for lo, hi in ((0, 10), (10, 20), (20, 99))]
        assert rows[f"fold {k}"] == (len(mine), want)
    assert rows["all training"][0] == len(angles)
    html = write_run_report(experiment, tmp_path / "angles.html").read_text()
    assert html.count('class="angle-row"') == cfg.data.n_splits + 1


def test_test_angles_come_from_the_predicted_masks(trained, tiny_root, tmp_path):
    cfg, _, _, _ = trained
    labels = tiny_root / "test_labels"
    truth = _label_angles(labels)
    shapes = png_shapes(discover(tiny_root, "test"))
    # a "prediction" that draws the labels: its angles are the labels' own
    rows = []
    for name in shapes:
        doc = next(labels.rglob(Path(name).with_suffix(".json").name))
        rows.append((name, rle.encode_many(dense_truth(load_annotation(doc), shapes[name]))))
    csv = write_submission(tmp_path / "truth.csv", rows)
    measured = submission_angles(csv, shapes)
    assert list(measured.index) == list(shapes)
    for name, angle in measured.items():
        assert angle == pytest.approx(truth[name], abs=1.0)
    html = write_ensemble_report(cfg, csv, labels, out=tmp_path / "e.html").read_text()
    assert "test (predicted)" in html and "test (labels)" in html
