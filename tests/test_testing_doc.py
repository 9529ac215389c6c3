"""docs/testing.md names, for every config key, the test that follows it from where the
user sets it to where it lands: every leaf key of ``bonecomp/config.py`` has a row (a key
added without one fails here), no row names a key that is gone, each row names a test or
says ``gap:``, and every test it names exists."""

from __future__ import annotations

import ast
import re
import typing
from functools import cache

import pytest
from pydantic import BaseModel

from bonecomp.config import Config
from bonecomp.testing import REPO

DOC = REPO / "docs" / "testing.md"
TEST_REF = re.compile(r"tests/(test_\w+\.py)::(\w+)")


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key's dotted name, as base.yaml lists them; a list of sections
    (``infer.ensemble``) also by its entries' keys (``infer.ensemble[].weight``)."""
    out = []
    for name, f in cls.model_fields.items():
        tp = f.annotation
        if _model(tp):
            out += leaf_keys(tp, f"{prefix}{name}.")
            continue
        out.append(prefix + name)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and _model(args[0]):
            out += leaf_keys(args[0], f"{prefix}{name}[].")
    return out


def _model(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


@cache
def rows() -> dict[str, str]:
    """Backticked key of each table row's first cell -> the row's test cell."""
    out = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"`[\w.\[\]]+`", cells[0]):
            out[cells[0].strip("`")] = cells[1]
    return out


def missing_rows(cls: type = Config) -> list[str]:
    return [k for k in leaf_keys(cls) if k not in rows()]


def test_every_config_key_has_a_row():
    assert len(leaf_keys()) > 90  # the walk reaches every section and list entry
    assert missing_rows() == [], "add a row to docs/testing.md for each"


def test_a_key_added_without_a_row_is_caught():
    class WithANewKey(Config):
        brand_new: int = 1
        """a key nobody documented yet"""

    assert missing_rows(WithANewKey) == ["brand_new"]


def test_no_row_names_a_key_that_is_gone():
    known = set(leaf_keys())
    assert [k for k in rows() if k not in known] == []


def test_each_row_names_a_test_or_says_gap():
    for k, cell in rows().items():
        assert TEST_REF.search(cell) or cell.startswith(("same", "gap:")), k


@cache
def _functions(module: str) -> set[str]:
    path = REPO / "tests" / module
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("module, name", sorted(set(TEST_REF.findall(DOC.read_text()))))
def test_every_test_the_doc_names_exists(module, name):
    assert (REPO / "tests" / module).is_file(), module
    assert name in _functions(module), f"tests/{module}::{name}"
