"""Bad-input corpus: each broken input, run through the real script, ends in one line on
stderr that names the file, with exit code 2 (train.py) or 1 (verify_data.py), and leaves
no temporary or partial cache behind."""

from __future__ import annotations

import errno
import json
import multiprocessing
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonecomp.data import cache as cache_mod
from bonecomp.testing import DEMO_CONFIG, tiny_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train as train_script
import verify_data

# ------------------------------------------------------------------------ the corpus


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _edit_json(root: Path, edit: Callable[[dict], None]) -> Path:
    path = _first(root, "train/outputs_json/*/*.json")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def wrong_size(root: Path) -> list[str]:
    """A PNG at half the size its JSON's points assume (1024 px PNG, 2048 px frame)."""
    png = _first(root, "train/DCM/*/*.png")
    img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(png), cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2)))
    js = root / "train" / "outputs_json" / png.relative_to(root / "train" / "DCM")
    return [str(js.with_suffix(".json")), str(png), "64x64"]


def point_outside(root: Path) -> list[str]:
    def edit(doc: dict) -> None:
        doc["annotations"][3]["points"][0] = [500, 10]

    return [str(_edit_json(root, edit)), "outside"]


def truncated_png(root: Path) -> list[str]:
    png = _first(root, "train/DCM/*/*.png")
    png.write_bytes(png.read_bytes()[:200])
    return [str(png), "cannot decode"]


def empty_png(root: Path) -> list[str]:
    png = _first(root, "train/DCM/*/*.png")
    png.write_bytes(b"")
    return [str(png), "cannot decode"]


def invalid_json(root: Path) -> list[str]:
    js = _first(root, "train/outputs_json/*/*.json")
    js.write_text('{"annotations": [')
    return [str(js), "cannot read JSON"]


def unknown_label(root: Path) -> list[str]:
    def edit(doc: dict) -> None:
        doc["annotations"][0]["label"] = "finger-99"

    return [str(_edit_json(root, edit)), "unknown label 'finger-99'"]


TRAIN_CASES = [wrong_size, point_outside, truncated_png, empty_png, invalid_json, unknown_label]


def missing_test(root: Path) -> list[str]:
    shutil.rmtree(root / "test")
    return [str(root / "test" / "DCM"), "missing"]


def empty_test(root: Path) -> list[str]:
    for d in (root / "test" / "DCM").iterdir():
        shutil.rmtree(d)
    return [str(root / "test" / "DCM"), "no PNG images"]


VERIFY_CASES = [missing_test, empty_test]


@pytest.fixture
def bad_input(tiny_copy: Path) -> Callable[[Callable[[Path], list[str]]], list[str]]:
    """Damage the private phantom copy with one corpus case; the fragments its error
    must show (the file first)."""
    return lambda case: case(tiny_copy)


# ------------------------------------------------------------------------ the checks


def _train(data: Path, work: Path, *extra: str) -> int:
    args = ["--config", str(DEMO_CONFIG), "--fold", "0", "--quiet"]
    return train_script.main(args + tiny_overrides(data, work) + list(extra))


def _one_error_line(err: str, fragments: list[str]) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _nothing_left(work: Path) -> None:
    cache = work / "cache"
    left = [p for p in cache.rglob("*") if ".tmp-" in p.name or p.name.startswith("train_")]
    assert not left, left
    assert not multiprocessing.active_children()  # the build's workers are gone


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda f: f.__name__)
def test_bad_training_data_stops_the_cache_build_in_one_line(
    bad_input, case, tiny_copy, tmp_path, capsys
):
    fragments = bad_input(case)
    assert _train(tiny_copy, tmp_path) == 2
    line = _one_error_line(capsys.readouterr().err, fragments)
    assert f"scripts/verify_data.py {tiny_copy}" in line
    _nothing_left(tmp_path)


def test_skip_mode_trains_without_the_bad_image_and_names_it(
    bad_input, tiny_copy, tmp_path, capsys
):
    js, png, _ = bad_input(wrong_size)
    assert _train(tiny_copy, tmp_path, "data.on_bad_image=skip", "train.epochs=1") == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert len(warnings) == 1 and js in warnings[0] and png in warnings[0], warnings
    (folder,) = (tmp_path / "cache").glob("*/train_64")
    index = (folder / "index.csv").read_text()
    assert Path(png).name not in index and len(index.splitlines()) == 1 + 9


def test_disk_too_small_for_the_cache_is_one_line(tiny_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache_mod, "_free_bytes", lambda path: 1000)
    assert _train(tiny_copy, tmp_path) == 2
    line = _one_error_line(capsys.readouterr().err, ["needs", "only 0.00 GB is free"])
    assert str(tmp_path / "cache") in line and "data.cache_dir" in line
    _nothing_left(tmp_path)


def test_disk_full_while_writing_removes_the_partial_cache(
    tiny_copy, tmp_path, monkeypatch, capsys
):
    real = np.save

    def full(file, *args, **kwargs):
        if ".tmp-" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(cache_mod.np, "save", full)
    assert _train(tiny_copy, tmp_path) == 2
    line = _one_error_line(capsys.readouterr().err, ["disk is full", "partial cache was removed"])
    assert str(tmp_path / "cache") in line
    _nothing_left(tmp_path)


@pytest.mark.parametrize("case", VERIFY_CASES, ids=lambda f: f.__name__)
def test_verify_data_reports_a_missing_or_empty_test_folder(bad_input, case, tiny_copy, capsys):
    path, fragment = bad_input(case)
    assert verify_data.main([str(tiny_copy), "--quiet"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"{path}: " in out[0] and fragment in out[0], out
    assert out[-1].startswith("1 problem(s)"), out


def truncated_test_png(root: Path) -> list[str]:
    png = _first(root, "test/DCM/*/*.png")
    png.write_bytes(png.read_bytes()[:200])
    return [str(png), "cannot decode"]


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "loader-workers"])
def test_bad_test_png_at_inference_is_one_line(
    tiny_root, bad_input, tiny_copy, tmp_path, capsys, workers
):
    import infer as infer_script

    work = tmp_path / "work"
    assert _train(tiny_root, work, "train.epochs=1") == 0  # a model from the intact phantom
    fragments = bad_input(truncated_test_png)
    capsys.readouterr()
    args = ["--config", str(DEMO_CONFIG), "--ensemble", "--quiet", "--data", str(tiny_copy)]
    args += ["--out", str(tmp_path / "sub.csv")]
    extra = tiny_overrides(tiny_root, work, **{"infer.num_workers": workers})
    assert infer_script.main(args + extra) == 2
    _one_error_line(capsys.readouterr().err, fragments)
    assert not (tmp_path / "sub.csv").exists()
