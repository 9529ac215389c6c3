"""Annotation parsing: by label, ignoring misleading fields, every problem reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bonecomp.classes import CLASSES
from bonecomp.data.annotations import (
    AnnotationError,
    check_annotation,
    load_annotation,
    parse_annotation,
)


def _doc():
    anns = [
        {
            "id": str(c),
            "type": "poly_seg",
            "attributes": {},
            "label": name,
            "points": [[c, 1], [c + 5, 1], [c + 5, 9], [c, 9]],
        }
        for c, name in enumerate(CLASSES)
    ]
    return {
        "annotations": anns[::-1],
        "filename": "x.jpg",
        "metadata": {"height": 3060},
        "extra": 1,
    }


def test_mapped_by_label_not_position():
    polys = parse_annotation(_doc())
    assert len(polys) == 29
    for c in range(29):
        assert polys[c][0].tolist() == [c, 1]


def test_loads_phantom_json(tiny_root):
    path = next((tiny_root / "train" / "outputs_json").glob("*/*.json"))
    polys = load_annotation(path)
    doc = json.loads(path.read_text())
    by_label = {a["label"]: a["points"] for a in doc["annotations"]}
    for c, name in enumerate(CLASSES):
        np.testing.assert_array_equal(polys[c], by_label[name])


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.pop("annotations"), "annotations"),
        (lambda d: d["annotations"][0].update(label="finger-30"), "unknown label"),
        (lambda d: d["annotations"].append(dict(d["annotations"][1])), "duplicate"),
        (lambda d: d["annotations"].pop(), "missing class"),
        (lambda d: d["annotations"][0].update(points=[[1, 2], [3, 4]]), "at least 3"),
        (lambda d: d["annotations"][0].update(points=[[1.5, 2], [3, 4], [5, 6]]), "non-integer"),
        (
            lambda d: d["annotations"][0].update(points=[[float("inf"), 2], [3, 4], [5, 6]]),
            "non-finite",
        ),
        (lambda d: d["annotations"][0].update(points="abc"), "pairs"),
        (lambda d: d["annotations"][0].update(label=["Radius"]), "unknown label"),
    ],
)
def test_problems_are_reported(mutate, fragment):
    doc = _doc()
    mutate(doc)
    assert any(fragment in p for p in check_annotation(doc))
    with pytest.raises(AnnotationError, match=fragment):
        parse_annotation(doc, "some/file.json")


def test_out_of_image_needs_the_size():
    doc = _doc()
    doc["annotations"][3]["points"] = [[0, 0], [300, 0], [300, 5]]
    assert check_annotation(doc) == []
    assert any("outside the 256x256 image" in p for p in check_annotation(doc, (256, 256)))


def test_parse_checks_the_frame_when_given_and_keeps_every_problem():
    doc = _doc()
    doc["annotations"][3]["points"] = [[0, 0], [300, 0], [300, 5]]
    assert len(parse_annotation(doc, "f.json")) == 29  # no frame: nothing to refuse
    with pytest.raises(AnnotationError, match=r"f\.json: .*outside the 256x256") as e:
        parse_annotation(doc, "f.json", (256, 256))
    assert e.value.problems == check_annotation(doc, (256, 256))


def test_all_problems_listed_together():
    doc = _doc()
    doc["annotations"][0]["points"] = [[1, 2]]
    doc["annotations"][1]["label"] = "nope"
    assert len(check_annotation(doc)) >= 3  # short polygon, unknown label, missing class


def test_unreadable_json_names_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"bad\.json"):
        load_annotation(bad)


def test_a_key_given_twice_is_refused_naming_the_file(tmp_path):
    """json keeps the last of two equal keys silently (a polygon would vanish unseen)."""
    path = tmp_path / "dup.json"
    text = json.dumps(_doc())
    first = text.index('"points"')
    path.write_text(text[:first] + '"points": [[1, 1], [9, 1], [9, 9]], ' + text[first:])
    with pytest.raises(AnnotationError, match=r"dup\.json: .*key 'points' is given twice"):
        load_annotation(path)
