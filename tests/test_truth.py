"""Truth polygons by image: the cache's (whole-image or crop cache) equal the JSON's, and
without a valid cache (deleted, stale) they come from the JSON at layout's path."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bonecomp.data import truth as truth_mod
from bonecomp.data.annotations import AnnotationError, load_annotation
from bonecomp.data.cache import CacheSpec, data_cache_dir, find_cache, open_cache
from bonecomp.data.carpal_box import crop_polygons, index_boxes
from bonecomp.data.layout import annotation_path, discover
from bonecomp.data.truth import GroundTruth, as_truth
from bonecomp.testing import tiny_config


def _same(a, b) -> bool:
    return np.array_equal(a.points, b.points) and np.array_equal(a.offsets, b.offsets)


def _built(root, work, **extra):
    """A config's data section and the cache training would open for it."""
    data = tiny_config(root, work, **extra).data
    folder = data_cache_dir(data.cache_dir, data.root)
    spec = CacheSpec.from_config(data)
    cache = open_cache(discover(data.root), folder, spec, workers=1, progress=False)
    return data, cache


def _no_json(monkeypatch):
    """Make any JSON read fail: what still works came from the cache."""

    def refuse(path, image_hw=None):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(truth_mod, "load_annotation", refuse)


def test_the_cache_gives_the_jsons_polygons(tiny_copy, tmp_path, monkeypatch):
    data, cache = _built(tiny_copy, tmp_path)
    truth = GroundTruth.of(data)
    assert truth.cache is not None and truth.cache.dir == cache.dir
    assert truth.source == f"cache {cache.dir}"
    want = {rel: load_annotation(annotation_path(tiny_copy, rel)) for rel in cache.index["rel"]}
    _no_json(monkeypatch)
    for rel, polys in want.items():
        assert _same(truth.polygons(rel), polys)
        box = (10, 90, 20, 100)
        assert _same(truth.polygons(rel, box), crop_polygons(polys, box))


def test_a_crop_cache_gives_the_whole_images_polygons(tiny_copy, tmp_path, monkeypatch):
    data, cache = _built(tiny_copy, tmp_path, **{"data.crop": "carpal"})
    truth = GroundTruth.of(data)
    assert truth.cache is not None and truth.cache.dir.name.endswith("carpal-m0.25")
    boxes = index_boxes(cache.index)
    want = {rel: load_annotation(annotation_path(tiny_copy, rel)) for rel in cache.index["rel"]}
    _no_json(monkeypatch)
    for i, (rel, polys) in enumerate(want.items()):
        assert _same(truth.polygons(rel), polys)  # shifted back from the box: exact
        assert _same(truth.polygons(rel, boxes[i]), cache.polygons(i))  # the OOF's frame


def test_without_a_valid_cache_the_json_is_read(tiny_copy, tmp_path):
    data = tiny_config(tiny_copy, tmp_path).data
    assert find_cache(data) is None  # never built: nothing is built here either
    assert not (tmp_path / "cache").exists()
    truth = GroundTruth.of(data)
    rel = discover(tiny_copy)["rel"][3]
    assert truth.cache is None and truth.source.startswith("annotation JSON under")
    assert _same(truth.polygons(rel), load_annotation(annotation_path(tiny_copy, rel)))
    assert as_truth(tiny_copy).cache is None and as_truth(truth) is truth

    data, _ = _built(tiny_copy, tmp_path)
    assert find_cache(data) is not None
    js = annotation_path(tiny_copy, rel)
    os.utime(js, ns=(js.stat().st_atime_ns, js.stat().st_mtime_ns + 10**9))  # edited since
    assert find_cache(data) is None  # stale: its polygons may be old


def test_a_missing_annotation_names_its_file(tiny_copy, tmp_path):
    truth = GroundTruth(tiny_copy)
    with pytest.raises(AnnotationError, match=r"outputs_json/ID999/nope\.json"):
        truth.polygons("ID999/nope.png")
