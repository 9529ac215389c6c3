"""GroupKFold by patient, written once to a CSV and reused, so every run sees the same split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.model_selection import GroupKFold

from bonecomp.fileio import atomic_write


class FoldsError(ValueError):
    """A folds file that does not match the data it is meant to split."""


def make_folds(df: pd.DataFrame, n_splits: int = 5, seed: int | None = None) -> pd.DataFrame:
    """Assign a fold to each image with GroupKFold, patients as groups.

    ``seed=None`` is sklearn's deterministic size-balanced split; an int shuffles patients.
    Returns columns image (relative path), patient, fold.
    """
    n_patients = df["patient"].nunique()
    if n_patients < n_splits:
        raise FoldsError(f"{n_patients} patients cannot fill {n_splits} folds")
    kw = {"shuffle": True, "random_state": seed} if seed is not None else {}
    folds = pd.Series(-1, index=df.index, dtype=int)
    for k, (_, val) in enumerate(
        GroupKFold(n_splits=n_splits, **kw).split(df, groups=df["patient"])
    ):
        folds.iloc[val] = k
    return pd.DataFrame({"image": df["rel"], "patient": df["patient"], "fold": folds.values})


def folds_path(cache_dir: Path | str, n_splits: int, seed: int | None) -> Path:
    return Path(cache_dir) / f"folds_{n_splits}split_seed{'none' if seed is None else seed}.csv"


def load_or_make_folds(
    df: pd.DataFrame, path: Path | str, n_splits: int = 5, seed: int | None = None
) -> pd.DataFrame:
    """Folds for ``df`` from ``path``; made and written (atomically) the first time.

    An existing file is reused as it is: an image it does not know, or a patient split
    across folds, is an error (delete the file to re-split) rather than a silent re-split.
    Images in the file but not in ``df`` (excluded ones) are dropped.
    """
    path = Path(path)
    if not path.exists():
        folds = make_folds(df, n_splits, seed)
        with atomic_write(path) as f:
            folds.to_csv(f, index=False)
    folds = pd.read_csv(path, dtype={"image": str, "patient": str, "fold": int})
    if list(folds.columns) != ["image", "patient", "fold"]:
        raise FoldsError(f"{path}: expected columns image,patient,fold; got {list(folds.columns)}")
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
