"""Folds by patient: no patient in two folds, deterministic, written once and reused;
stratified by wrist angle, the bent hands spread over the folds and the rule in the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from bonecomp.checks import check_config
from bonecomp.config import ConfigError, load_config
from bonecomp.data.folds import (
    FoldsError,
    folds_path,
    load_or_make_folds,
    make_folds,
    stratify_table,
)
from bonecomp.data.layout import discover
from bonecomp.data.phantom import make_phantom, plan_patients
from bonecomp.data.phantom.plan import concentrate_bends
from bonecomp.runs import run_dir
from bonecomp.testing import DEMO_CONFIG, tiny_config
from bonecomp.training import fold as fold_module
from bonecomp.training import run_training
from tests.test_bad_inputs import _one_error_line, _train


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


# ------------------------------------------------------------------ stratified by wrist angle
N_BENT = 5  # of 10 training patients, both hands bent (make_phantom's bent_patients)


@pytest.fixture(scope="module")
def bent_root(tmp_path_factory) -> Path:
    """A 128 px phantom whose bent wrists are concentrated in 5 of 10 patients (seed 0)."""
    root = tmp_path_factory.mktemp("bent")
    make_phantom(root, 10, 0, size=128, seed=0, workers=1, progress=False, bent_patients=N_BENT)
    return root


@pytest.fixture(scope="module")
def bent_table(bent_root) -> tuple[pd.DataFrame, set[str]]:
    """The bent phantom's table and the patients the generator bent (from its plan, not
    from any measure)."""
    jobs = concentrate_bends(plan_patients(0, 10, 0), 0, N_BENT)
    return discover(bent_root), {j.patient_id for j in jobs if j.bent}


def _bent_per_fold(folds: pd.DataFrame, bent: set[str]) -> list[int]:
    per_patient = folds.groupby("patient")["fold"].first()
    return [sum(p in bent for p in per_patient.index[per_patient == k]) for k in range(5)]


def test_stratified_folds_keep_patients_whole_and_balance_bent_wrists(bent_table):
    df, bent = bent_table
    plain = make_folds(df, 5)
    strat = make_folds(df, 5, strata=stratify_table(df, "wrist_angle", 5))
    for folds in (plain, strat):
        assert folds.groupby("patient")["fold"].nunique().max() == 1  # patients kept whole
        assert folds["image"].tolist() == df["rel"].tolist()
    # five bent patients over five folds: one each when stratified; plain GroupKFold
    # (the phantom's patient order) piles them up
    assert _bent_per_fold(strat, bent) == [1, 1, 1, 1, 1]
    assert max(_bent_per_fold(plain, bent)) >= 2
    # every fold's validation holds straight hands too
    assert all((strat[strat["fold"] == k]["stratum"] == 0).any() for k in range(5))


def test_the_folds_file_records_the_rule(bent_table, tmp_path):
    df, _ = bent_table
    plain_path = folds_path(tmp_path, 5, None)
    strat_path = folds_path(tmp_path, 5, None, "wrist_angle")
    assert plain_path != strat_path and "wrist_angle" in strat_path.name
    strat = load_or_make_folds(df, strat_path, 5, stratify="wrist_angle")
    written = pd.read_csv(strat_path)
    assert list(written.columns) == ["image", "patient", "fold", "wrist_angle", "stratum"]
    assert (written["stratum"] > 0).sum() == 2 * N_BENT  # the bent hands, as measured
    assert strat["fold"].tolist() == written["fold"].tolist()
    plain = load_or_make_folds(df, plain_path, 5)
    assert list(pd.read_csv(plain_path).columns) == ["image", "patient", "fold"]
    # a file of the other rule under either name is refused, never reused
    shutil.copy(strat_path, plain_path)
    with pytest.raises(FoldsError, match=r"made with data\.fold_stratify=wrist_angle"):
        load_or_make_folds(df, plain_path, 5)
    plain.to_csv(strat_path, index=False)
    with pytest.raises(FoldsError, match=r"data.fold_stratify=wrist_angle\); it was columns"):
        load_or_make_folds(df, strat_path, 5, stratify="wrist_angle")


def test_too_few_bent_patients_for_the_folds_is_one_line_naming_the_key(bent_table):
    df, bent = bent_table
    few = df[~df["patient"].isin(sorted(bent)[:3])]  # two bent patients left, 5 folds
    with pytest.raises(FoldsError, match=r"^data.fold_stratify=wrist_angle: .*n_splits=5") as e:
        stratify_table(few, "wrist_angle", 5)
    assert "\n" not in str(e.value)
    assert len(stratify_table(few, "wrist_angle", 2)) == len(few)  # two folds: enough
    with pytest.raises(ConfigError) as e:
        stratify_table(df, "elbow", 5)
    assert str(e.value) == "data.fold_stratify: unknown fold stratifier 'elbow'; valid: wrist_angle"


def test_training_refuses_an_unstratifiable_split_before_the_cache(tiny_root, tmp_path, capsys):
    # the tiny phantom has five patients and at most one bent hand: nothing to stratify by
    assert _train(tiny_root, tmp_path, "data.fold_stratify=wrist_angle") == 2
    _one_error_line(capsys.readouterr().err, ["data.fold_stratify=wrist_angle", "n_splits"])
    assert not list((tmp_path / "cache").rglob("train_*"))  # no cache was built


def test_an_unknown_stratification_key_is_refused_by_the_config(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["data.fold_stratify=elbow"])  # a name: the registry checks
    with pytest.raises(ConfigError, match=r"^command line: data\.fold_stratify: unknown") as e:
        check_config(cfg)
    assert "\n" not in str(e.value) and "valid: wrist_angle" in str(e.value)


def test_a_stratified_run_trains_and_validates_on_the_stratified_split(
    bent_root, bent_table, tmp_path, monkeypatch
):
    """``data.fold_stratify=wrist_angle`` set as a user sets it reaches the split a run
    uses: its validation (the run's ``oof_index.csv``) holds one of the five bent patients,
    and its training batches hold every other patient, never a validation one."""
    df, bent = bent_table
    # a fold that plain GroupKFold fills with other than one bent patient: a run that
    # ignored the key would fail here
    fold = next(k for k, n in enumerate(_bent_per_fold(make_folds(df, 5), bent)) if n != 1)
    trained: set[str] = set()
    real_epoch = fold_module.train_one_epoch

    def recording(model, loader, *args, **kw):
        rel = loader.dataset.cache.index["rel"]
        trained.update(rel.iloc[i] for b in loader for i in b["index"].tolist())
        return real_epoch(model, loader, *args, **kw)

    monkeypatch.setattr(fold_module, "train_one_epoch", recording)
    cfg = tiny_config(
        bent_root, tmp_path, **{"data.fold_stratify": "wrist_angle", "train.epochs": 1}
    )
    run_training(cfg, fold, progress=False)
    val = set(pd.read_csv(run_dir(cfg, fold).oof_index)["rel"].str.split("/").str[0])
    train = {rel.split("/")[0] for rel in trained}
    assert len(val & bent) == 1 and len(val) == 2  # two of ten patients, one of them bent
    assert train == set(df["patient"]) - val  # the other eight, whole
