"""GroupKFold by patient: no patient in two folds, deterministic, written once and reused."""

from __future__ import annotations

import pandas as pd
import pytest

from bonecomp.data.folds import FoldsError, folds_path, load_or_make_folds, make_folds


def _table(n_patients=12):
    rows = [(f"ID{p:03d}", f"ID{p:03d}/image{p}{s}.png") for p in range(n_patients) for s in "RL"]
    return pd.DataFrame(rows, columns=["patient", "rel"])


def test_grouped_and_balanced():
    folds = make_folds(_table(), 5)
    assert folds.groupby("patient")["fold"].nunique().max() == 1
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds["image"].tolist() == _table()["rel"].tolist()


def test_deterministic_and_seed_changes_split():
    df = _table(20)
    assert make_folds(df, 5).equals(make_folds(df, 5))
    assert make_folds(df, 5, seed=1).equals(make_folds(df, 5, seed=1))
    assert not make_folds(df, 5, seed=1)["fold"].equals(make_folds(df, 5, seed=2)["fold"])


def test_written_once_and_reused(tmp_path):
    df = _table()
    path = folds_path(tmp_path, 5, None)
    first = load_or_make_folds(df, path, 5)
    mtime = path.stat().st_mtime_ns
    edited = pd.read_csv(path)
    edited.loc[edited["patient"] == "ID000", "fold"] = 4  # a hand edit is respected
    edited.to_csv(path, index=False)
    again = load_or_make_folds(df, path, 5)
    assert (again.loc[again["patient"] == "ID000", "fold"] == 4).all()
    assert not again.equals(first) and path.stat().st_mtime_ns != mtime
    subset = load_or_make_folds(df.iloc[2:], path, 5)  # excluded images simply drop out
    assert len(subset) == len(df) - 2


def test_unknown_images_and_split_patients_rejected(tmp_path):
    path = tmp_path / "folds.csv"
    load_or_make_folds(_table(6), path, 5)
    with pytest.raises(FoldsError, match="does not cover"):
        load_or_make_folds(_table(8), path, 5)
    bad = pd.read_csv(path)
    bad.loc[0, "fold"] = (bad.loc[1, "fold"] + 1) % 5  # split a patient's two hands
    bad.to_csv(path, index=False)
    with pytest.raises(FoldsError, match="more than one fold"):
        load_or_make_folds(_table(6), path, 5)


def test_too_few_patients():
    with pytest.raises(FoldsError, match="cannot fill"):
        make_folds(_table(3), 5)
