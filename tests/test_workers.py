"""No worker outlives its parent (``bonecomp.workers``), even one busy in a long call
that holds the GIL, where a thread polling ``getppid`` (the old way) cannot run.

Each test runs a real parent in a subprocess whose workers call the production init
path (cache pool, phantom pool, training and inference DataLoaders) and then a test item
that marks its start, holds the GIL for tens of seconds in one C loop, and marks its end.
The parent is killed with SIGKILL once every worker is busy; the workers must be gone
within a generous wait (10 s) that is still far shorter than the item (about a minute of
GIL holding): without PDEATHSIG they would stay for the whole item. Whatever happens,
the test then kills what is left of its own workers, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonecomp.data.cache import CacheSpec, check_cache, open_cache, source_fingerprint
from bonecomp.data.layout import discover
from bonecomp.testing import REPO

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's"
)

BUSY = """
import os, sys, time
from pathlib import Path

if __name__ == "__mp_main__" and os.environ.get("SLOW_IMPORT"):
    # a spawn worker imports its parent's main module first: a slow import (torch,
    # cv2 on a loaded machine) stands for all of them
    (Path(os.environ["WORKER_MARKS"]) / f"importing-{os.getpid()}").touch()
    time.sleep(60)


def busy(*args, **kwargs):
    marks = Path(os.environ["WORKER_MARKS"])
    (marks / f"started-{os.getpid()}").touch()
    # ~1 min in one C loop (builtin sum over a range; the total stays below 2**63, so
    # it never leaves C's fast path): the GIL is never let go
    sum(range(4 * 10**9))
    (marks / f"finished-{os.getpid()}").touch()
    os._exit(0)


if __name__ == "__main__":  # spawn workers re-import this file as __mp_main__
    kind, data, work = sys.argv[1:]
    if kind == "cache":
        from bonecomp.data import cache as cache_mod

        cache_mod._cache_item = busy
        spec = cache_mod.CacheSpec(64)
        cache_mod.open_cache(cache_mod.discover(data), work, spec, workers=2, progress=False)
    elif kind == "phantom":
        from bonecomp.data.phantom import write

        write._write_patient = busy
        write.make_phantom(Path(work) / "phantom", 2, 0, size=128, workers=2, progress=False)
    elif kind == "train":
        import numpy as np

        from bonecomp.data.cache import CacheSpec, open_cache
        from bonecomp.data.dataset import BoneDataset
        from bonecomp.data.layout import discover
        from bonecomp.testing import tiny_config
        from bonecomp.training.data import build_loaders

        cfg = tiny_config(data, work, **{"data.num_workers": 2, "train.batch_size": 2})
        c = Path(work) / "c"
        cache = open_cache(discover(data), c, CacheSpec(64), workers=1, progress=False)
        rows = np.arange(len(cache))
        BoneDataset.__getitem__ = busy  # the forked workers inherit it
        next(iter(build_loaders(cfg, cache, rows[2:], rows[:2]).train_loader))
    elif kind == "infer":
        import torch

        from bonecomp.data.dataset import TestImages
        from bonecomp.data.layout import discover
        from bonecomp.inference.predict import predicted_batches
        from bonecomp.testing import tiny_config

        cfg = tiny_config(data, work, **{"infer.num_workers": 2, "infer.batch_size": 1})
        TestImages.__getitem__ = busy
        next(predicted_batches(None, discover(data, "test"), [64], cfg, torch.device("cpu"),
                               "infer", progress=False))
"""


def _alive(pid: int) -> bool:
    """A live process (not a zombie left for its new parent to reap)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int, marker: str) -> list[int]:
    """Live children of ``pid`` whose command line holds ``marker``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and marker in cmd:
            kids.append(int(stat.parent.name))
    return kids


def _kill_parent_mid_item(kind: str, data: Path, work: Path) -> tuple[list[int], list[int]]:
    """Run the ``kind`` parent, SIGKILL it while both its workers are in their busy item;
    return (the workers' pids, the parent's resource trackers' pids), once all are gone."""
    marks = work / "marks"
    marks.mkdir(parents=True)
    script = work / "busy_parent.py"
    script.write_text(BUSY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORKER_MARKS": str(marks)}
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, str(data), str(work)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180  # start-up on a loaded 2-core machine
        while len(list(marks.glob("started-*"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the workers never started their items"
            time.sleep(0.05)
        trackers = _children(proc.pid, "resource_tracker")
    finally:
        proc.send_signal(signal.SIGKILL)  # a no-op when it has already exited
        proc.wait()
    workers = [int(p.name.split("-")[1]) for p in marks.glob("started-*")]
    try:
        deadline = time.monotonic() + 10  # generous: PDEATHSIG acts at once; the item lasts ~1 min
        while any(map(_alive, workers + trackers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in workers + trackers if _alive(p)]
        assert not left, f"processes outlived their parent: {left}"
        assert not list(marks.glob("finished-*"))
    finally:
        for pid in workers + trackers:  # our own children's pids, checked seconds ago
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    return workers, trackers


def test_cache_pool_workers_and_tracker_die_with_their_parent_mid_item(tiny_root, tmp_path):
    work = tmp_path / "c"
    _, trackers = _kill_parent_mid_item("cache", tiny_root, work)
    assert trackers, "a spawn pool's resource tracker was expected (and checked)"
    stale = list(work.glob(".train_64.tmp-*"))
    assert len(stale) == 1  # the killed builder's partial cache ...
    df = discover(tiny_root)
    cache = open_cache(df, work, CacheSpec(64), workers=1, progress=False)
    assert not stale[0].exists() and len(cache) == 10  # ... the next run removes
    assert check_cache(cache.dir, source_fingerprint(df, CacheSpec(64))) is None


@pytest.mark.parametrize("kind", ["train", "infer", "phantom"])
def test_loader_and_phantom_workers_die_with_their_parent_mid_item(kind, tiny_root, tmp_path):
    _kill_parent_mid_item(kind, tiny_root, tmp_path / "w")


def test_a_worker_whose_parent_died_before_it_armed_the_signal_exits():
    """The parent may die while the worker starts: the pid it was given is then no
    longer its parent, and it exits at once instead of working for nobody."""
    code = "from bonecomp.workers import end_with_parent\nend_with_parent(1)\nprint('ran on')"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "ran on" not in done.stdout


def test_without_pdeathsig_the_polling_thread_ends_an_idle_worker(tmp_path):
    """The fallback elsewhere than Linux (PDEATHSIG unavailable): a thread polling
    ``getppid`` ends a worker that lets go of the GIL (here: sleeping) once its parent dies."""
    started = tmp_path / "started"
    child = (
        "import sys, time\nfrom pathlib import Path\nfrom bonecomp import workers\n"
        "workers._set_pdeathsig = lambda sig: False  # as on a system without prctl\n"
        "workers.end_with_parent(int(sys.argv[1]))\n"
        "Path(sys.argv[2]).write_text(str(__import__('os').getpid()))\ntime.sleep(120)\n"
    )
    parent = (
        "import os, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid()), sys.argv[2]])\n"
        "import time; time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", parent, child, str(started)], env=env)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not started.exists() or not started.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the worker never started"
            time.sleep(0.05)
        worker = int(started.read_text())
        assert _alive(worker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        deadline = time.monotonic() + 10  # generous: the thread polls every 0.2 s
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the polling thread did not end the orphaned worker"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("kind", ["cache", "phantom"])
def test_spawn_workers_die_with_their_parent_while_importing(kind, tiny_root, tmp_path):
    """A spawn worker imports its parent's main module and its own modules (seconds of
    torch, cv2) before any initializer runs: the parent-death signal is armed first
    thing in the new interpreter, so a parent killed then takes its workers (and, with
    them, the resource tracker) within a second, not after their imports (issue 29, 13)."""
    work = tmp_path / "w"
    marks = work / "marks"
    marks.mkdir(parents=True)
    script = work / "busy_parent.py"
    script.write_text(BUSY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORKER_MARKS": str(marks), "SLOW_IMPORT": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, str(tiny_root), str(work)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work,
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(list(marks.glob("importing-*"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the workers never started importing"
            time.sleep(0.05)
        trackers = _children(proc.pid, "resource_tracker")
        workers = [int(p.name.split("-")[1]) for p in marks.glob("importing-*")]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        killed = time.monotonic()
        while any(map(_alive, workers)) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        took = time.monotonic() - killed
        left = [p for p in workers if _alive(p)]
        assert not left and took < 2.0, f"workers {left} outlived their parent ({took:.1f} s)"
        while any(map(_alive, trackers)) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        assert not [p for p in trackers if _alive(p)], "the resource tracker outlived them"
    finally:
        for pid in workers + trackers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
