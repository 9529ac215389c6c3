"""The tuning scripts' own options are checked before any out-of-fold map is read: one
line naming the option, exit 2 (issue 29, case 10). No trained run is needed: a bad
option must be reported before the members are even looked for."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from bonecomp.testing import DEMO_CONFIG, REPO, tiny_overrides

sys.path.insert(0, str(REPO / "scripts"))

CASES = [
    ("tune_thresholds", ["--out", "{folder}"], r"--out: .*/folder is a folder"),
    ("tune_thresholds", ["--grid", "0.3", "0.5", "1.5"], r"--grid: 1\.5 is not in \(0, 1\)"),
    ("tune_thresholds", ["--grid", "nan", "0.5"], r"--grid: nan is not in \(0, 1\)"),
    ("tune_thresholds", ["--grid", "0.3", "0.4"], r"--grid must hold 0\.5"),
    ("tune_thresholds", ["--min-gain", "-1"], r"--min-gain: -1\.0 must be a number >= 0"),
    ("tune_thresholds", ["--min-gain", "nan"], r"--min-gain: nan must be a number >= 0"),
    ("tune_ensemble", ["--out", "{folder}"], r"--out: .*/folder is a folder"),
    ("tune_ensemble", ["--grid", "0", "0.5"], r"--grid: 0\.0 is not in \(0, 1\)"),
    ("tune_ensemble", ["--min-gain", "-5"], r"--min-gain: -5\.0 must be a number >= 0"),
    ("tune_cleanup", ["--out", "{folder}"], r"--out: .*/folder is a folder"),
    ("tune_cleanup", ["--min-gain", "nan"], r"--min-gain: nan must be a number >= 0"),
    ("crop_oof", ["--grid", "0", "1.5"], r"--grid: 1\.5 is not in \[0, 1\]"),
    ("crop_oof", ["--min-gain", "-1"], r"--min-gain: -1\.0 must be a number >= 0"),
]


@pytest.mark.parametrize(
    "script, options, says", CASES, ids=[f"{s} {' '.join(o)}" for s, o, _ in CASES]
)
def test_a_bad_tuning_option_is_one_line_before_any_work(
    script, options, says, tiny_root, tmp_path, capsys
):
    folder = tmp_path / "folder"
    folder.mkdir()
    options = [o.format(folder=folder) for o in options]
    main = importlib.import_module(script).main
    overrides = tiny_overrides(tiny_root, tmp_path)  # before the options: --grid takes many
    args = ["--config", str(DEMO_CONFIG), "--quiet", *overrides, *options]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(says, err), err
    assert list(folder.iterdir()) == []
