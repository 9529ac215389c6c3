"""Shared fixtures: one tiny phantom data set per test session (read-only for tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bonecomp.testing import tiny_phantom


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
