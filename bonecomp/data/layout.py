"""Find the images (and their annotation JSONs) of a data root laid out as in docs/format.md.

    ROOT/train/DCM/ID001/image1661130828152_R.png
    ROOT/train/outputs_json/ID001/image1661130828152_R.json
    ROOT/test/DCM/ID040/image1661319116107.png

Images and JSONs pair by relative path with the extension swapped; tables are sorted by
relative path (the order the submission uses).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

PHANTOM_HINT = (
    "Expected the competition layout (docs/format.md): <root>/train/DCM/ID*/*.png, "
    "<root>/train/outputs_json/ID*/*.json, <root>/test/DCM/ID*/*.png. Put the data there "
    "or set data.root=<folder>; or run the demo on the built-in phantom: `make demo` (or "
    "`python scripts/make_phantom.py --out data/phantom` then "
    "`python scripts/train.py --config configs/demo.yaml --fold 0`)."
)
COLUMNS = ["patient", "rel", "name", "image_path", "json_path"]


class DataLayoutError(FileNotFoundError):
    """The data root is missing, empty or not laid out as docs/format.md says."""


def image_path(root: Path | str, rel: str, split: str = "train") -> Path:
    """The PNG of image ``rel`` (``<ID>/<name>.png``): ``root/<split>/DCM/<rel>``."""
    return Path(root) / split / "DCM" / rel


def annotation_path(root: Path | str, rel: str) -> Path:
    """The annotation JSON of training image ``rel`` (``<ID>/<name>.png``):
    ``root/train/outputs_json/<ID>/<name>.json``, the one place that spells it."""
    return annotation_dir(root) / Path(rel).with_suffix(".json")


def annotation_dir(root: Path | str) -> Path:
    """The training annotations' folder: ``root/train/outputs_json``."""
    return Path(root) / "train" / "outputs_json"


def find_images(root: Path | str, split: str = "train") -> list[Path]:
    """PNG paths under ``root/<split>/DCM``, relative to that folder, sorted."""
    dcm = Path(root) / split / "DCM"
    if not dcm.is_dir():
        raise DataLayoutError(f"{Path(root)}: no {split}/DCM folder. {PHANTOM_HINT}")
    return sorted(p.relative_to(dcm) for p in dcm.glob("*/*.png"))


def find_jsons(folder: Path | str) -> list[Path]:
    """Annotation JSON paths ``folder/<ID>/<stem>.json``, relative to ``folder``, sorted."""
    folder = Path(folder)
    return sorted(p.relative_to(folder) for p in folder.glob("*/*.json"))


def discover(root: Path | str, split: str = "train", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Table of one split: patient, rel (ID/name), name, image_path, json_path.

    ``json_path`` is empty for the test split. Training images without a JSON (or JSONs
    without an image), patient folders without images, and an empty split are errors that
    name the root and the files. ``exclude`` drops training images given by file name,
    stem or relative path (for the real images with known annotation errors).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} ({root.resolve()}) does not exist. {PHANTOM_HINT}")
    images = find_images(root, split)
    dcm = root / split / "DCM"
    empty = sorted(d.name for d in dcm.iterdir() if d.is_dir() and not any(d.glob("*.png")))
    if empty:
        raise DataLayoutError(f"{dcm}: patient folders without PNG images: {_few(empty)}")
    if not images:
        raise DataLayoutError(f"{dcm}: no images (expected {split}/DCM/ID*/*.png). {PHANTOM_HINT}")
    json_paths = [""] * len(images)
    if split == "train":
        jdir = annotation_dir(root)
        if not jdir.is_dir():
            raise DataLayoutError(f"{root}: no train/outputs_json folder. {PHANTOM_HINT}")
        jsons = {p.with_suffix("") for p in find_jsons(jdir)}
        imgs = {p.with_suffix("") for p in images}
        problems = []
        if imgs - jsons:
            problems.append(f"images without JSON: {_few(sorted(imgs - jsons), jdir, '.json')}")
        if jsons - imgs:
            problems.append(f"JSONs without image: {_few(sorted(jsons - imgs), dcm, '.png')}")
        if problems:
            raise DataLayoutError(f"{root}: unpaired training files; " + "; ".join(problems))
        json_paths = [str(annotation_path(root, p.as_posix())) for p in images]
    df = pd.DataFrame(
        {
            "patient": [p.parts[0] for p in images],
            "rel": [p.as_posix() for p in images],
            "name": [p.name for p in images],
            "image_path": [str(dcm / p) for p in images],
            "json_path": json_paths,
        },
        columns=COLUMNS,
    )
    return apply_exclude(df, exclude)


def apply_exclude(df: pd.DataFrame, exclude: Iterable[str]) -> pd.DataFrame:
    """Drop rows named in ``exclude`` (file name, stem or relative path); warn on unknowns."""
    exclude = list(exclude)
    if not exclude:
        return df
    keys = {*exclude}
    stems = df["name"].str.rsplit(".", n=1).str[0]
    hit = df["name"].isin(keys) | df["rel"].isin(keys) | stems.isin(keys)
    known = set(df["name"]) | set(df["rel"]) | set(stems)
    unknown = sorted(keys - known)
    if unknown:
        warnings.warn(f"exclude list names images not in the data: {unknown}", stacklevel=2)
    return df[~hit].reset_index(drop=True)


def _few(items: list, folder: Path | None = None, suffix: str = "", n: int = 5) -> str:
    shown = [str(folder / Path(i).with_suffix(suffix)) if folder else str(i) for i in items[:n]]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(shown) + more
