"""Shared fixtures: one tiny phantom data set per test session (read-only for tests)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from bonecomp.registry import restore_point
from bonecomp.testing import tiny_phantom


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``) each worker takes its share of
    the cores for torch, here and in the scripts the tests start, so that N workers do not
    each run a thread per core (N times more threads than cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128 px phantom: 5 training patients (10 images), 2 test patients (4 images).

    Shared by many tests: never modify it; copy it first (``tiny_copy``).
    """
    return tiny_phantom(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_copy(tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny phantom that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_root, dst)
    return dst


# ----------------------------------------------------------------------- isolation
@pytest.fixture
def registries():
    """What a test registers (itself, or by importing an extension module) is undone
    afterwards in every registry, and the extension modules it imported are forgotten."""
    restore = restore_point()
    before = set(sys.modules)
    yield
    restore()
    for name in set(sys.modules) - before:
        if name.startswith("bonecomp_extension_"):
            del sys.modules[name]


REPO = Path(__file__).resolve().parents[1]
GUARDED = ("runs", "submissions", "cache", "data")  # what `make demo` writes


def _snapshot() -> dict[str, tuple[int, int]]:
    files = {}
    for name in GUARDED:
        for p in (REPO / name).rglob("*"):
            if p.is_file():
                st = p.stat()
                files[str(p.relative_to(REPO))] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.fixture(scope="session", autouse=True)
def repository_folders_untouched():
    """The suite leaves the repository's runs/, submissions/, cache/ and data/ as it found
    them (a demo run before or after the tests must not change what they see)."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests changed files of the repository: {changed[:10]}"


@pytest.fixture(autouse=True)
def in_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own empty working folder: relative paths such as the
    default runs/, cache/ or data/competition never reach the repository's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
