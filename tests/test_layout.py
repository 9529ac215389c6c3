"""Layout discovery: pairing, sorting, clear errors, exclude list."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bonecomp.data.layout import DataLayoutError, annotation_path, discover, image_path


def test_train_table(tiny_root):
    df = discover(tiny_root, "train")
    assert list(df.columns) == ["patient", "rel", "name", "image_path", "json_path"]
    assert len(df) == 10 and df["patient"].nunique() == 5
    assert df["rel"].tolist() == sorted(df["rel"])
    for rel, img, js in zip(df["rel"], df["image_path"], df["json_path"], strict=True):
        assert img.endswith(rel)
        assert js.endswith(rel.replace(".png", ".json")) and "outputs_json" in js
    assert df["patient"].tolist() == [r.split("/")[0] for r in df["rel"]]


def test_paths_of_an_image_are_spelled_once(tiny_root):
    df = discover(tiny_root)
    for rel, img, js in zip(df["rel"], df["image_path"], df["json_path"], strict=True):
        assert image_path(tiny_root, rel) == Path(img) and Path(img).is_file()
        assert annotation_path(tiny_root, rel) == Path(js) and Path(js).is_file()
    assert annotation_path("r", "ID001/a.png") == Path("r/train/outputs_json/ID001/a.json")
    assert image_path("r", "ID040/b.png", "test") == Path("r/test/DCM/ID040/b.png")


def test_test_table_has_no_json(tiny_root):
    df = discover(tiny_root, "test")
    assert len(df) == 4 and (df["json_path"] == "").all()
    assert df["rel"].tolist() == sorted(df["rel"])


def test_missing_root_names_it_and_the_phantom(tmp_path):
    with pytest.raises(DataLayoutError, match=r"make_phantom\.py") as e:
        discover(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    with pytest.raises(DataLayoutError, match="train/DCM"):
        discover(tmp_path)


def test_unpaired_files_are_named(tiny_copy):
    js = next((tiny_copy / "train" / "outputs_json").glob("*/*.json"))
    js.unlink()
    with pytest.raises(DataLayoutError, match="images without JSON") as e:
        discover(tiny_copy)
    assert js.name in str(e.value)


def test_empty_patient_folder(tiny_copy):
    folder = next((tiny_copy / "train" / "DCM").iterdir())
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(DataLayoutError, match=folder.name):
        discover(tiny_copy)


def test_exclude_by_name_stem_or_path(tiny_root):
    df = discover(tiny_root)
    name, rel = df["name"].iloc[0], df["rel"].iloc[1]
    stem = df["name"].iloc[2].removesuffix(".png")
    kept = discover(tiny_root, exclude=[name, rel, stem])
    assert len(kept) == len(df) - 3
    assert not {name, rel} & (set(kept["name"]) | set(kept["rel"]))
    with pytest.warns(UserWarning, match="not in the data"):
        discover(tiny_root, exclude=["image0000000000000.png"])
