"""One rule for what a data set holds: the integrity check, training and inference read
a data root the same way (``layout.scan_images``), so a folder the check rejects never
trains silently on less or gives a submission its own validator calls OK."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonecomp.testing import DEMO_CONFIG, REPO, tiny_overrides
from tests.test_bad_inputs import _one_error_line, _train  # the corpus's own checks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import infer as infer_script
import verify_data


def _pngs(root: Path, split: str) -> list[Path]:
    return sorted((root / split / "DCM").glob("*/*.png"))


# ------------------------------------------------------------ damage, in either split


def upper_case_extension(root: Path, split: str) -> Path:
    png = _pngs(root, split)[0]
    bad = png.with_suffix(".PNG")
    png.rename(bad)  # in train its JSON stays: the image's name is what is wrong
    return bad


def nested_image(root: Path, split: str) -> Path:
    png = _pngs(root, split)[0]
    sub = png.parent / "more"
    sub.mkdir()
    png.rename(sub / png.name)
    return sub


def broken_symlink(root: Path, split: str) -> Path:
    png = _pngs(root, split)[0]
    png.unlink()
    png.symlink_to(root / "gone" / png.name)
    return png


def duplicate_stem(root: Path, split: str) -> Path:
    """The second patient's first image renamed to the first patient's first stem."""
    first, second = sorted((root / split / "DCM").iterdir())[:2]
    stem = sorted(first.glob("*.png"))[0].stem
    src = sorted(second.glob("*.png"))[0]
    src.rename(second / f"{stem}.png")
    if split == "train":
        jdir = root / "train" / "outputs_json" / second.name
        (jdir / f"{src.stem}.json").rename(jdir / f"{stem}.json")
    return Path(stem)


def stray_file(root: Path, split: str) -> Path:
    path = _pngs(root, split)[0].parent / "notes.txt"
    path.write_text("a file that is not an image")
    return path


DAMAGE = [upper_case_extension, nested_image, broken_symlink, duplicate_stem, stray_file]


def one_pixel_image(root: Path, split: str) -> Path:
    """A 1x1 PNG (decodes, complete): verify_data rejects its size; so must inference."""
    png = _pngs(root, split)[0]
    cv2.imwrite(str(png), np.zeros((1, 1), np.uint8))
    return png


TEST_DAMAGE = [*DAMAGE, one_pixel_image]  # the test split's rules: also the images' sizes


def _verify_names(root: Path, path: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify_data.main([str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert str(path) in out, out


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_training_refuses_what_the_check_rejects(damage, tiny_copy, tmp_path, capsys):
    path = damage(tiny_copy, "train")
    _verify_names(tiny_copy, path, capsys)
    assert _train(tiny_copy, tmp_path / "work", "train.epochs=1") == 2
    _one_error_line(capsys.readouterr().err, [str(path), "verify_data.py"])
    assert not (tmp_path / "work" / "runs").exists()  # refused before any run folder


@pytest.fixture(scope="module")
def trained(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch model of the intact phantom (its work folder)."""
    work = tmp_path_factory.mktemp("work")
    assert _train(tiny_root, work, "train.epochs=1") == 0
    return work


@pytest.mark.parametrize("damage", TEST_DAMAGE, ids=lambda f: f.__name__)
def test_inference_refuses_what_the_check_rejects(
    damage, tiny_root, trained, tiny_copy, tmp_path, capsys
):
    path = damage(tiny_copy, "test")
    _verify_names(tiny_copy, path, capsys)
    out = tmp_path / "sub.csv"
    args = ["--config", str(DEMO_CONFIG), "--ensemble", "--quiet", "--data", str(tiny_copy)]
    args += ["--out", str(out), *tiny_overrides(tiny_root, trained)]
    assert infer_script.main(args) == 2
    _one_error_line(capsys.readouterr().err, [str(path)])
    assert not out.exists()  # never a CSV that lacks an image


def test_hidden_files_are_ignored_by_every_tool(tiny_copy, tmp_path, capsys):
    for split in ("train", "test"):
        (_pngs(tiny_copy, split)[0].parent / ".DS_Store").write_bytes(b"\0")
    assert verify_data.main([str(tiny_copy), "--quiet"]) == 0
    assert _train(tiny_copy, tmp_path / "work", "train.epochs=1") == 0


# ------------------------------------------------------------ annotations and keys


def _edit_first_json(root: Path, edit: Callable[[dict], None]) -> Path:
    path = sorted((root / "train" / "outputs_json").glob("*/*.json"))[0]
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def test_a_polygon_with_an_absurd_number_of_points_is_refused_naming_the_file(
    tiny_copy, tmp_path, capsys
):
    """200,000 random points would take cv2.fillPoly hours; the check refuses it first."""
    import numpy as np

    rng = np.random.default_rng(0)
    points = rng.integers(0, 128, (200_000, 2)).tolist()
    path = _edit_first_json(tiny_copy, lambda d: d["annotations"][0].update(points=points))
    _verify_names(tiny_copy, path, capsys)
    assert _train(tiny_copy, tmp_path / "work", "train.epochs=1") == 2
    _one_error_line(capsys.readouterr().err, [str(path), "200000 points"])


def test_a_polygon_of_an_ordinary_size_is_accepted(tiny_copy):
    """The limit leaves real outlines alone: one point per pixel of a 2048 px outline."""
    from bonecomp.data.annotations import check_annotation

    doc = json.loads(sorted((tiny_copy / "train" / "outputs_json").glob("*/*.json"))[0].read_text())
    doc["annotations"][0]["points"] = [[x, 0] for x in range(2048)] + [
        [2047 - x, 2047] for x in range(2048)
    ]
    assert check_annotation(doc, (2048, 2048)) == []


@pytest.mark.parametrize("key", ["train.output_dir", "data.cache_dir", "infer.out_dir"])
@pytest.mark.parametrize("where", ["the file", "below the file"])
def test_an_output_folder_that_is_a_file_is_one_line(key, where, tiny_root, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    target = afile if where == "the file" else afile / "sub"
    assert _train(tiny_root, tmp_path / "work", f"{key}={target}") == 2
    _one_error_line(capsys.readouterr().err, [key, str(target)])
    assert afile.read_text() == "keep me"


def test_an_excluded_image_is_left_out_of_the_run(tiny_root, tmp_path):
    """``data.exclude`` by file stem: the run's cache and folds hold the other nine."""
    png = _pngs(tiny_root, "train")[0]
    assert _train(tiny_root, tmp_path, f"data.exclude=[{png.stem}]", "train.epochs=1") == 0
    (folder,) = (tmp_path / "cache").glob("*/train_64")
    index = (folder / "index.csv").read_text()
    assert png.name not in index and len(index.splitlines()) == 1 + 9
    (folds,) = folder.parent.glob("folds_*.csv")
    text = folds.read_text()
    assert png.name not in text and len(text.splitlines()) == 1 + 9


def test_excluding_every_image_says_excluded_not_unusable(tiny_root, tmp_path, capsys):
    names = ",".join(p.name for p in _pngs(tiny_root, "train"))
    assert _train(tiny_root, tmp_path / "work", f"data.exclude=[{names}]") == 2
    line = _one_error_line(capsys.readouterr().err, ["data.exclude", "excludes every one"])
    assert "unusable" not in line


def test_a_symlinked_image_that_reaches_a_file_is_read(tiny_copy, tmp_path):
    """Links into another disk are how data sets are shared: a live one is an image."""
    png = _pngs(tiny_copy, "test")[0]
    target = tmp_path / "elsewhere.png"
    shutil.move(png, target)
    os.symlink(target, png)
    from bonecomp.data.layout import discover

    assert png.name in set(discover(tiny_copy, "test")["name"])


def test_a_file_name_that_is_not_utf8_is_one_line_not_a_segfault(
    tiny_root, trained, tiny_copy, tmp_path
):
    """cv2.imread crashed the process (SIGSEGV) on a name that is not valid UTF-8: the
    check lists it, inference refuses it in one line (both name it, the odd bytes shown as
    \\xff), in their own processes as a user runs them (issue 29, case 4)."""
    png = _pngs(tiny_copy, "test")[0]
    bad = os.fsencode(png.parent) + b"/" + os.fsencode(png.stem) + b"\xff.png"
    os.rename(os.fsencode(png), bad)
    shown = os.fsdecode(bad).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = partial(subprocess.run, capture_output=True, text=True, timeout=300, env=env)
    check = run(
        [sys.executable, str(REPO / "scripts" / "verify_data.py"), str(tiny_copy), "--quiet"]
    )
    assert check.returncode == 1, (check.returncode, check.stderr[-2000:])
    assert f"{shown}: file name is not valid UTF-8" in check.stdout, check.stdout
    out = tmp_path / "sub.csv"
    args = ["--config", str(DEMO_CONFIG), "--ensemble", "--quiet", "--data", str(tiny_copy)]
    args += ["--out", str(out), *tiny_overrides(tiny_root, trained)]
    done = run([sys.executable, str(REPO / "scripts" / "infer.py"), *args])
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    _one_error_line(done.stderr, [shown, "not valid UTF-8", "verify_data.py"])
    assert not out.exists()
