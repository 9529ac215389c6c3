"""Integrity check: a clean phantom passes; each kind of damage is reported with its file."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonecomp.data.verify import verify_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import verify_data


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _edit_json(root: Path, edit) -> Path:
    path = _first(root, "train/outputs_json/*/*.json")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def _points(doc, pts, k=0):
    doc["annotations"][k]["points"] = pts


def test_clean_phantom_passes(tiny_root, capsys):
    before = _tree_hash(tiny_root)
    report = verify_dataset(tiny_root, progress=False)
    assert report.ok, report.problems
    assert (report.patients, report.images, report.annotations) == (7, 14, 290)
    assert verify_data.main([str(tiny_root), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out
    assert _tree_hash(tiny_root) == before  # never modifies the data


def _damage_cases():
    def unpaired_image(r):
        js = _first(r, "train/outputs_json/*/*.json")
        js.unlink()
        return _first(r, "train/DCM/*/*.png"), "without annotation JSON"

    def unpaired_json(r):
        png = _first(r, "train/DCM/*/*.png")
        png.unlink()
        return _first(r, "train/outputs_json/*/*.json"), "JSON without image"

    def truncated(r):
        png = _first(r, "train/DCM/*/*.png")
        png.write_bytes(png.read_bytes()[:-40])
        return png, "truncated"

    def not_png(r):
        png = _first(r, "test/DCM/*/*.png")
        png.write_bytes(b"hello")
        return png, "not a PNG"

    def wrong_size(r):
        png = _first(r, "train/DCM/*/*.png")
        cv2.imwrite(str(png), np.zeros((16, 16), np.uint8))
        return png, "below the 32 px"

    def bad_json(r):
        js = _first(r, "train/outputs_json/*/*.json")
        js.write_text("{oops")
        return js, "cannot read JSON"

    def no_annotations(r):
        return _edit_json(r, lambda d: d.pop("annotations")), "annotations"

    def unknown_label(r):
        return _edit_json(
            r, lambda d: d["annotations"][0].update(label="finger-99")
        ), "unknown label"

    def duplicate_label(r):
        return _edit_json(r, lambda d: d["annotations"].append(d["annotations"][0])), "duplicate"

    def missing_class(r):
        return _edit_json(r, lambda d: d["annotations"].pop()), "missing class"

    def few_points(r):
        return _edit_json(r, lambda d: _points(d, [[1, 1], [5, 5]])), "at least 3"

    def float_points(r):
        return _edit_json(r, lambda d: _points(d, [[1.5, 1], [5, 5], [9, 1]])), "non-integer"

    def nan_points(r):
        return _edit_json(
            r, lambda d: _points(d, [[float("nan"), 1], [5, 5], [9, 1]])
        ), "non-finite"

    def outside(r):
        return _edit_json(r, lambda d: _points(d, [[1, 1], [500, 5], [9, 1]])), "outside"

    def duplicate_key(r):  # json keeps the last "points" silently; both are valid polygons
        path = _first(r, "train/outputs_json/*/*.json")
        text = path.read_text()
        first = text.index('"points"')
        path.write_text(text[:first] + '"points": [[1, 1], [9, 1], [9, 9]], ' + text[first:])
        return path, "key 'points' is given twice"

    def duplicate_stem(r):
        png = _first(r, "test/DCM/*/*.png")
        other = sorted((r / "test" / "DCM").iterdir())[-1]
        shutil.copy(png, other / png.name)
        return Path(png.stem), "several patients"

    return [
        unpaired_image,
        unpaired_json,
        truncated,
        not_png,
        wrong_size,
        bad_json,
        no_annotations,
        unknown_label,
        duplicate_label,
        missing_class,
        few_points,
        float_points,
        nan_points,
        outside,
        duplicate_key,
        duplicate_stem,
    ]


@pytest.mark.parametrize("damage", _damage_cases(), ids=lambda f: f.__name__)
def test_each_problem_is_reported_with_its_file(tiny_copy, damage, capsys):
    path, fragment = damage(tiny_copy)
    report = verify_dataset(tiny_copy, progress=False)
    assert not report.ok
    hits = [p for p in report.problems if fragment in p.message]
    assert hits, [str(p) for p in report.problems]
    assert any(str(path) in p.file or path.name in p.file for p in hits)
    assert verify_data.main([str(tiny_copy), "--quiet"]) == 1
    assert fragment in capsys.readouterr().out


def test_all_problems_reported_at_once(tiny_copy):
    cases = {f.__name__: f for f in _damage_cases()}
    cases["truncated"](tiny_copy)
    cases["not_png"](tiny_copy)
    js = sorted(tiny_copy.glob("train/outputs_json/*/*.json"))[-1]
    js.write_text("[]")
    report = verify_dataset(tiny_copy, progress=False)
    messages = " | ".join(str(p) for p in report.problems)
    assert "truncated" in messages and "not a PNG" in messages and js.name in messages


def test_not_a_data_root(tmp_path):
    report = verify_dataset(tmp_path / "missing", progress=False)
    assert not report.ok and "make_phantom" in report.problems[0].message


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_an_image_of_another_size_is_a_warning_not_a_problem(tiny_copy, capsys):
    """The competition's images are all one size; a test image of another is worth a look
    but no error: inference predicts and encodes it at its own size."""
    png = _first(tiny_copy, "test/DCM/*/*.png")
    cv2.imwrite(str(png), np.zeros((160, 96), np.uint8))
    report = verify_dataset(tiny_copy, progress=False)
    assert report.ok, [str(p) for p in report.problems]
    assert [w.file for w in report.warnings] == [str(png)]
    assert "differs from (128, 128)" in report.warnings[0].message
    assert verify_data.main([str(tiny_copy), "--quiet"]) == 0
    assert f"warning: {png}: image size (160, 96) differs" in capsys.readouterr().out
