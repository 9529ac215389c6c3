"""Folds by patient, written once to a CSV and reused, so every run sees the same split.

Plain (``data.fold_stratify: null``): GroupKFold, patients as groups. Stratified
(``wrist_angle``): scikit-learn's StratifiedGroupKFold, patients as groups and each
image's binned wrist angle (``bonecomp.data.wrist``) as the class, so every fold's
validation holds its share of bent hands. The rule is in the file's name
(``folds_5split_seednone_wrist_angle.csv``) and in its columns (``wrist_angle``, the
measured degrees, and ``stratum``, the bin used), so a plain file is never reused for a
stratified request or the other way round.

The rules are a registry, ``STRATIFIERS``: ``register_stratifier`` adds one (a per-image
measure and its bins), also from a user's module under ``extensions``
(docs/extending.md); ``data.fold_stratify`` names one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bonecomp.data import wrist
from bonecomp.fileio import atomic_write
from bonecomp.registry import Registry

COLUMNS = ["image", "patient", "fold"]
STRATA_COLUMNS = ["stratum"]  # after the measured value's column (named after the rule)
KEY = "data.fold_stratify"


class FoldsError(ValueError):
    """A folds file that does not match the data it is meant to split."""


@dataclass(frozen=True)
class Stratifier:
    """A registered rule: ``measure(table)``, one value per image of a layout table
    (``layout.discover``: rel, patient, image_path, json_path), indexed by ``rel``;
    ``to_bin(value)``, its bin (0, 1, ...; 0 also for a value that could not be measured);
    ``names``, the bins' names; ``merged``, the name of bins 1.. merged into one when
    they are too sparse for the folds."""

    measure: Callable[[pd.DataFrame], pd.Series]
    to_bin: Callable[[float], int]
    names: tuple[str, ...]
    merged: str


STRATIFIERS: Registry[Stratifier] = Registry("fold stratifier", KEY)


def register_stratifier(
    name: str,
    measure: Callable[[pd.DataFrame], pd.Series] | None = None,
    *,
    to_bin: Callable[[float], int],
    names: tuple[str, ...],
    merged: str | None = None,
    replace: bool = False,
):
    """Add the rule ``name`` (``data.fold_stratify: name``): ``register_stratifier(name,
    measure, to_bin=..., names=...)``, or ``@register_stratifier(name, to_bin=...,
    names=...)`` over ``measure``; see ``Stratifier``. Returns ``measure``. A name already
    registered is refused (``ValueError``) unless ``replace=True``."""

    def add(fn: Callable[[pd.DataFrame], pd.Series]):
        together = merged or " + ".join(names[1:])
        STRATIFIERS.register(name, Stratifier(fn, to_bin, tuple(names), together), replace=replace)
        return fn

    return add if measure is None else add(measure)


register_stratifier(
    "wrist_angle",
    wrist.table_angles,
    to_bin=wrist.angle_bin,
    names=wrist.BIN_NAMES,
    merged=wrist.BENT_NAME,
)


def stratify_table(df: pd.DataFrame, rule: str, n_splits: int) -> pd.DataFrame:
    """Per image of ``df`` (indexed by ``rel``): the measured value (column named after the
    rule) and its ``stratum``.

    When a bin above the first (a bent one) holds fewer patients than ``n_splits``, the
    bins above the first are merged into one (all bent hands); if a bin is still too
    sparse, or a single one is left, there is nothing to stratify by and a ``FoldsError``
    names ``data.fold_stratify``. Cheap (annotation JSONs only): call it before expensive
    work.
    """
    s = STRATIFIERS.get(rule)  # an unknown one: the registry's one line
    values = s.measure(df)
    strata = values.map(s.to_bin).astype(int)
    patients = pd.Series(df["patient"].to_numpy(), index=df["rel"].to_numpy())
    have = patients.groupby(strata).nunique().to_dict()
    labels = dict(enumerate(s.names))
    if any(n < n_splits for b, n in have.items() if b > 0):
        strata[strata > 0] = 1
        labels[1] = s.merged
        have = patients.groupby(strata).nunique().to_dict()
    described = ", ".join(f"{labels[b]}: {n}" for b, n in sorted(have.items()))
    if len(have) < 2 or min(have.values()) < n_splits:
        raise FoldsError(
            f"{KEY}={rule}: patients per bin ({described}) cannot spread over "
            f"data.n_splits={n_splits} folds (two bins of >= {n_splits} patients each are "
            f"needed); use fewer folds or {KEY}=null"
        )
    return pd.DataFrame({rule: values, "stratum": strata})


def check_patients(df: pd.DataFrame, n_splits: int) -> None:
    """Enough patients for ``data.n_splits`` folds (each fold validates on patients of its
    own): a ``FoldsError`` naming the key otherwise. Cheap: call it before any work."""
    n_patients = df["patient"].nunique()
    if n_patients < n_splits:
        raise FoldsError(
            f"data.n_splits={n_splits}: {n_patients} patients cannot fill {n_splits} folds "
            f"(each fold validates on patients of its own); set data.n_splits <= {n_patients}"
        )


def make_folds(
    df: pd.DataFrame,
    n_splits: int = 5,
    seed: int | None = None,
    strata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Assign a fold to each image, patients as groups: GroupKFold, or with ``strata``
    (``stratify_table``, indexed by ``rel``) StratifiedGroupKFold on its ``stratum``.

    ``seed=None`` is sklearn's deterministic split; an int shuffles patients.
    Returns columns image (relative path), patient, fold (and the strata's columns).
    """
    # imported here: scikit-learn takes ~1.6 s to import, and only the first run on a data
    # root splits it (every script imports this module for its errors)
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    check_patients(df, n_splits)
    kw = {"shuffle": True, "random_state": seed} if seed is not None else {}
    folds = pd.Series(-1, index=df.index, dtype=int)
    if strata is None:
        splits = GroupKFold(n_splits=n_splits, **kw).split(df, groups=df["patient"])
    else:
        strata = strata.loc[df["rel"]]
        y = strata["stratum"].to_numpy()
        splits = StratifiedGroupKFold(n_splits=n_splits, **kw).split(df, y, df["patient"])
    for k, (_, val) in enumerate(splits):
        folds.iloc[val] = k
    out = pd.DataFrame({"image": df["rel"], "patient": df["patient"], "fold": folds.values})
    if strata is not None:
        for c in strata.columns:
            out[c] = strata[c].to_numpy()
    return out


def folds_path(
    cache_dir: Path | str, n_splits: int, seed: int | None, stratify: str | None = None
) -> Path:
    """The folds file of a split rule; a stratified one carries the rule in its name."""
    rule = f"_{stratify}" if stratify else ""
    seed_part = "none" if seed is None else seed
    return Path(cache_dir) / f"folds_{n_splits}split_seed{seed_part}{rule}.csv"


def load_or_make_folds(
    df: pd.DataFrame,
    path: Path | str,
    n_splits: int = 5,
    seed: int | None = None,
    stratify: str | None = None,
    strata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Folds for ``df`` from ``path``; made and written (atomically) the first time.

    ``stratify``: the ``data.fold_stratify`` rule (None: plain); ``strata``: its
    ``stratify_table`` when the caller measured it already (else measured here).
    An existing file is reused as it is: an image it does not know, a patient split
    across folds, or another rule than asked is an error (delete the file to re-split)
    rather than a silent re-split. Images in the file but not in ``df`` (excluded ones)
    are dropped.
    """
    path = Path(path)
    if not path.exists():
        if stratify is not None and strata is None:
            strata = stratify_table(df, stratify, n_splits)
        folds = make_folds(df, n_splits, seed, strata if stratify else None)
        with atomic_write(path) as f:
            folds.to_csv(f, index=False)
    folds = pd.read_csv(path, dtype={"image": str, "patient": str, "fold": int})
    want = COLUMNS + ([stratify, *STRATA_COLUMNS] if stratify else [])
    if list(folds.columns) != want:
        made = (
            f"made with {KEY}={folds.columns[3]}"
            if len(folds.columns) == len(COLUMNS) + 2
            else f"columns {list(folds.columns)}"
        )
        raise FoldsError(
            f"{path}: expected columns {','.join(want)} ({KEY}={stratify or 'null'}); it was "
            f"{made}: delete it to make new folds"
        )
    missing = sorted(set(df["rel"]) - set(folds["image"]))
    if missing:
        raise FoldsError(
            f"{path} does not cover {len(missing)} image(s) of the data (e.g. {missing[:3]}); "
            "delete it to make new folds"
        )
    if (folds.groupby("patient")["fold"].nunique() > 1).any():
        raise FoldsError(f"{path}: a patient appears in more than one fold")
    folds = folds[folds["image"].isin(set(df["rel"]))]
    return folds.set_index("image").loc[df["rel"]].reset_index()
