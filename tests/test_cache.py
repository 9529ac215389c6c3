"""Training cache: built once, reused, rebuilt on change, never trusted when damaged."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bonecomp.data import cache as cache_mod
from bonecomp.data.annotations import load_annotation
from bonecomp.data.cache import (
    CacheError,
    CacheSpec,
    bytes_per_image,
    cache_folder,
    check_cache,
    data_cache_dir,
    find_cache,
    open_cache,
    source_fingerprint,
)
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.testing import tiny_config
from bonecomp.training import data as training_data
from bonecomp.training.data import prepare_cache

SIZE = 64


@pytest.fixture
def built(tiny_copy, tmp_path):
    df = discover(tiny_copy)
    cache = open_cache(df, tmp_path / "cache", CacheSpec(SIZE), workers=1, progress=False)
    return df, cache, tmp_path / "cache"


def test_bytes_per_image_bounds_the_built_cache(built):
    _, cache, _ = built
    on_disk = sum(p.stat().st_size for p in cache.dir.iterdir()) / len(cache)
    assert cache.images.nbytes / len(cache) == SIZE * SIZE
    assert SIZE * SIZE < on_disk <= bytes_per_image(SIZE)
    assert bytes_per_image(2048) < 2048 * 2048 * 1.01  # no mask planes any more


def _counting(monkeypatch):
    calls = []
    real = cache_mod.build_cache
    monkeypatch.setattr(cache_mod, "build_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_contents(built):
    df, cache, _ = built
    assert len(cache) == len(df) == 10
    assert cache.images.shape == (10, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert cache.crc.shape == (10,) and not (cache.dir / "masks.npy").exists()
    for i in (0, 7):
        polys = cache.polygons(i)
        assert polys.points.tolist() == load_annotation(df["json_path"][i]).points.tolist()
        assert cache.src_hw(i) == (128, 128)
        png = read_image(df["image_path"][i])
        want = cv2.resize(png, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert np.array_equal(cache.image(i), want)
    assert cache.index["rel"].tolist() == df["rel"].tolist()


def test_an_annotation_is_checked_once_on_its_way_in(tiny_copy, tmp_path, monkeypatch):
    """One ``check_annotation`` per training image while the cache is built (it used to
    run twice: once with the PNG's frame, again inside ``parse_annotation``)."""
    from bonecomp.data import annotations

    calls = []
    real = annotations.check_annotation

    def counted(doc, image_hw=None):
        calls.append(image_hw)
        return real(doc, image_hw)

    monkeypatch.setattr(annotations, "check_annotation", counted)
    monkeypatch.setattr(cache_mod, "check_annotation", counted, raising=False)
    df = discover(tiny_copy)
    open_cache(df, tmp_path / "cache", CacheSpec(SIZE), workers=1, progress=False)
    assert calls == [(128, 128)] * len(df)  # once each, with the PNG's frame


def test_reused_when_unchanged(built, monkeypatch):
    df, _, folder = built
    calls = _counting(monkeypatch)
    open_cache(df, folder, CacheSpec(SIZE), workers=1, progress=False)
    assert calls == []


def test_rebuilt_when_a_source_changes_or_size_differs(built, monkeypatch):
    df, _, folder = built
    calls = _counting(monkeypatch)
    js = df["json_path"].iloc[3]
    st = os.stat(js)
    os.utime(js, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    open_cache(df, folder, CacheSpec(SIZE), workers=1, progress=False)
    assert calls == [1]
    open_cache(df, folder, CacheSpec(32), workers=1, progress=False)
    assert (
        calls == [1, 1] and (folder / "train_32").is_dir() and (folder / f"train_{SIZE}").is_dir()
    )


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_damaged_cache_is_detected_and_rebuilt(built, monkeypatch, damage):
    df, _, folder = built
    sub = folder / f"train_{SIZE}"
    fp = source_fingerprint(df, CacheSpec(SIZE))
    assert check_cache(sub, fp) is None and check_cache(sub, fp, verify=True) is None
    images = sub / "images.npy"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(images.read_bytes())
        data[len(data) // 2] ^= 0xFF
        images.write_bytes(bytes(data))
    elif damage == "manifest":
        (sub / "manifest.json").write_text("{")
    else:
        (sub / "points.npy").unlink()
    # a flipped byte inside a big array needs the full check; the rest is always caught
    assert check_cache(sub, fp, verify=True) is not None
    assert (check_cache(sub, fp) is None) == (damage == "flip")
    calls = _counting(monkeypatch)
    cache = open_cache(df, folder, CacheSpec(SIZE), workers=1, progress=False, verify=True)
    assert calls == [1] and check_cache(sub, fp) is None and len(cache) == 10


def test_flipped_bytes_inside_images_are_found_on_read_and_rebuilt(built, monkeypatch):
    df, cache, folder = built
    sub = folder / f"train_{SIZE}"
    row = 6
    start = cache.images.offset + row * SIZE * SIZE  # the .npy data follows its header
    with open(sub / "images.npy", "r+b") as f:
        f.seek(start + SIZE * SIZE // 2 + 3)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))  # one bit, deep inside one image row
    damaged = open_cache(
        df, folder, CacheSpec(SIZE), workers=1, progress=False
    )  # cheap open: passes
    for i in range(len(damaged)):
        if i != row:
            damaged.image(i)  # other rows read fine
    with pytest.raises(CacheError, match=rf"{sub}.*row {row} .*next run rebuilds"):
        damaged.image(row)
    with pytest.raises(CacheError):  # through the Dataset, as DataLoader workers read it
        BoneDataset(damaged, [row])[0]
    calls = _counting(monkeypatch)
    fresh = open_cache(df, folder, CacheSpec(SIZE), workers=1, progress=False)
    assert calls == [1] and not (sub / "DAMAGED").exists()
    png = read_image(df["image_path"][row])
    want = cv2.resize(png, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.array_equal(fresh.image(row), want)
    assert check_cache(sub, source_fingerprint(df, CacheSpec(SIZE))) is None


def test_crash_during_build_leaves_nothing_valid(tiny_copy, tmp_path, monkeypatch):
    df = discover(tiny_copy)
    real = cache_mod._cache_item
    seen = []

    def crash_on_fifth(job):
        seen.append(1)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(cache_mod, "_cache_item", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        open_cache(df, tmp_path / "c", CacheSpec(SIZE), workers=1, progress=False)
    sub = tmp_path / "c" / f"train_{SIZE}"
    assert check_cache(sub, source_fingerprint(df, CacheSpec(SIZE))) is not None
    assert not [p for p in (tmp_path / "c").iterdir() if "tmp" in p.name]  # cleaned up
    monkeypatch.setattr(cache_mod, "_cache_item", real)
    assert len(open_cache(df, tmp_path / "c", CacheSpec(SIZE), workers=1, progress=False)) == 10


def test_parallel_build_equals_serial(tiny_copy, tmp_path):
    df = discover(tiny_copy)
    a = open_cache(df, tmp_path / "a", CacheSpec(SIZE), workers=1, progress=False)
    b = open_cache(df, tmp_path / "b", CacheSpec(SIZE), workers=2, progress=False)
    for name in ("images.npy", "crc.npy", "points.npy", "offsets.npy"):
        assert (a.dir / name).read_bytes() == (b.dir / name).read_bytes()
    meta = json.loads((b.dir / "manifest.json").read_text())
    assert meta["size"] == SIZE and meta["n"] == 10


def test_cache_dirs_differ_by_data_root(tmp_path):
    a = data_cache_dir(tmp_path / "cache", tmp_path / "phantom")
    b = data_cache_dir(tmp_path / "cache", tmp_path / "other" / "phantom")
    assert a != b and a.parent == b.parent == tmp_path / "cache" and a.name.startswith("phantom-")
    assert data_cache_dir("cache", tmp_path / "phantom") == data_cache_dir(
        "cache", tmp_path / "phantom"
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"data.crop": "carpal"}, {"data.preprocess": ["clahe"]}, {"data.on_bad_image": "skip"}],
    ids=["whole", "crop", "clahe", "skip"],
)
def test_training_opens_the_cache_spec_of_its_config(tiny_root, tmp_path, monkeypatch, extra):
    """``CacheSpec.from_config`` is the one identity of the cache training opens, and
    ``cache_folder`` (what the doctor and ``find_cache`` look at) is its folder."""
    cfg = tiny_config(tiny_root, tmp_path, **extra)
    specs, real = [], training_data.open_cache

    def spy(df, cache_dir, spec, **kw):
        specs.append(spec)
        return real(df, cache_dir, spec, **kw)

    monkeypatch.setattr(training_data, "open_cache", spy)
    _, cache = prepare_cache(cfg, discover(tiny_root, "train"), Dist(), False)
    assert specs == [CacheSpec.from_config(cfg)] == [CacheSpec.from_config(cfg.data)]
    assert cache.dir == cache_folder(cfg.data)
    found = find_cache(cfg.data)
    assert found is not None and found.dir == cache.dir
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        CacheSpec(SIZE, on_bad_image="ignore")


# ------------------------------------------------------------------ kill -9 mid-build
_SLOW_BUILDER = """
import os, sys, time
from bonecomp.data import cache as cache_mod
from bonecomp.data.cache import CacheSpec
from bonecomp.data.layout import discover

real = cache_mod._cache_item


def slow_item(job):  # the test's own slowdown: each image takes a second in a worker
    time.sleep(float(os.environ["SLOW_BUILDER_SLEEP"]))
    return real(job)


if __name__ == "__main__":
    cache_mod._cache_item = slow_item
    data, cache = sys.argv[1:]
    cache_mod.open_cache(discover(data), cache, CacheSpec(64), workers=2, progress=False)
"""


def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_mid_build_ends_the_workers_and_the_next_run_cleans_up(tiny_root, tmp_path):
    script = tmp_path / "slow_builder.py"
    script.write_text(_SLOW_BUILDER)
    env = {**os.environ, "SLOW_BUILDER_SLEEP": "1.0"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cache_mod.__file__).parents[2]), *sys.path])
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_root), str(tmp_path / "c")],
                            env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)  # the pool's two workers (the resource tracker may come too)
            workers = [k for k in _children(proc.pid) if "spawn_main" in _cmdline(k)]
        assert len(workers) == 2, "the builder's workers never started"
        stale = tmp_path / "c" / f".train_64.tmp-{proc.pid}"
        assert stale.is_dir()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "workers outlived their killed parent"
    df = discover(tiny_root)
    cache = open_cache(df, tmp_path / "c", CacheSpec(64), workers=1, progress=False)
    assert not stale.exists() and len(cache) == 10
    assert check_cache(cache.dir, source_fingerprint(df, CacheSpec(64))) is None


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
def read_only(tmp_path):
    """``make(folder)``: a read-only bind mount of ``folder`` (a shared data set, a
    Kaggle-style input folder): writing there fails with EROFS, as root too."""
    mounts = []

    def make(folder: Path) -> Path:
        view = tmp_path / f"ro-{len(mounts)}"
        view.mkdir()
        for cmd in (["mount", "--bind", str(folder), str(view)],
                    ["mount", "-o", "remount,bind,ro", str(view)]):  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                if mounts or cmd[1] != "--bind":
                    subprocess.run(["umount", str(view)], capture_output=True)
                pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
        mounts.append(view)
        return view

    yield make
    gc.collect()  # the cache's memory maps hold its files
    for view in mounts:
        if subprocess.run(["umount", str(view)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)  # once unused


def test_a_complete_cache_on_a_read_only_mount_is_used(tiny_root, tmp_path, read_only):
    """Nothing needs writing, so no lock file is needed: training reads it as it is; a
    cache that is not complete there is one line naming data.cache_dir."""
    from bonecomp.distributed import Dist
    from bonecomp.testing import tiny_config
    from bonecomp.training import run_training
    from bonecomp.training.data import prepare_cache

    cfg = tiny_config(tiny_root, tmp_path, **{"train.epochs": 1})
    prepare_cache(cfg, discover(tiny_root), Dist(), False)  # cache and folds, writable
    view = read_only(tmp_path / "cache")
    with pytest.raises(OSError):
        (view / "probe").write_text("")  # the mount is read-only
    ro = tiny_config(tiny_root, tmp_path, **{"train.epochs": 1, "data.cache_dir": str(view)})
    result = run_training(ro, 0, progress=False)
    assert result.epochs_done == 1
    other = tiny_config(tiny_root, tmp_path, **{"data.image_size": 96, "data.cache_dir": str(view)})
    with pytest.raises(CacheError, match=r"read-only.*set data\.cache_dir to a writable folder"):
        prepare_cache(other, discover(tiny_root), Dist(), False)
