"""Find the images (and their annotation JSONs) of a data root laid out as in docs/format.md.

    ROOT/train/DCM/ID001/image1661130828152_R.png
    ROOT/train/outputs_json/ID001/image1661130828152_R.json
    ROOT/test/DCM/ID040/image1661319116107.png

Images and JSONs pair by relative path with the extension swapped; tables are sorted by
relative path (the order the submission uses).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bonecomp.data.images import printable

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


IMAGES_PER_PATIENT = 2  # one left and one right hand (docs/format.md)


@dataclass
class Listing:
    """What one split's ``DCM`` folder holds: the images (``ID/<name>.png``, relative to
    the folder, sorted) and every file that breaks the layout's rules, with what is wrong.

    The one reading of the layout: the integrity check reports ``problems``, training and
    inference refuse to start on them, so no tool reads a file another one skips.
    """

    dcm: Path
    images: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def scan_images(root: Path | str, split: str = "train") -> Listing:
    """The images of ``root/<split>/DCM`` and the files that break its rules.

    Rules: an image is ``<ID>/<name>.png`` (lower-case extension; names valid UTF-8) in a
    patient folder; every patient folder holds two; a stem names one image in the split
    (the submission and ``data.exclude`` know images by name); a symbolic link must reach
    a file. Any other file outside a patient folder, below one, or in one but not a
    ``.png`` breaks them. Hidden files (``.DS_Store``) are ignored everywhere.
    """
    dcm = Path(root) / split / "DCM"
    if not dcm.is_dir():
        raise DataLayoutError(f"{Path(root)}: no {split}/DCM folder. {PHANTOM_HINT}")
    listing = Listing(dcm)
    bad = listing.problems.append
    owners: dict[str, list[Path]] = defaultdict(list)
    for entry in _visible(dcm):
        if not _utf8(entry.name):
            bad((entry, NOT_UTF8))
            continue
        if not entry.is_dir():
            bad((entry, _broken(entry) or "file outside a patient folder"))
            continue
        count = 0
        for f in _visible(entry):
            if not _utf8(f.name):
                bad((f, NOT_UTF8))
            elif f.is_dir():
                nested = [p for p in f.rglob("*") if not p.is_dir()]
                if nested:
                    what = f"folder inside a patient folder; its {len(nested)} file(s) are not read"
                    bad((f, f"{what}: images belong in <ID>/<name>.png"))
            elif problem := _broken(f):
                bad((f, problem))
            elif f.suffix == ".png":
                listing.images.append(f.relative_to(dcm))
                owners[f.stem].append(entry)
                count += 1
            elif f.suffix.lower() == ".png":
                bad((f, f"extension {f.suffix!r}: rename it to {f.stem}.png"))
            else:
                bad((f, "not a .png image (a patient folder holds only its PNGs)"))
        if count != IMAGES_PER_PATIENT:
            bad((entry, f"holds {count} PNG image(s), expected {IMAGES_PER_PATIENT}"))
    for stem, folders in sorted(owners.items()):
        if len(folders) > 1:
            names = sorted(d.name for d in folders)
            bad((folders[0] / f"{stem}.png", f"image stem used by several patients: {names}"))
    listing.images.sort()
    listing.problems.sort(key=lambda item: str(item[0]))
    return listing


NOT_UTF8 = (
    "file name is not valid UTF-8 (its odd bytes shown as \\xNN): rename it; image names "
    "go into the submission, a UTF-8 text file"
)


def _utf8(name: str) -> bool:
    """Whether a file name read from the disk is valid UTF-8 (Python keeps the bytes of
    one that is not as surrogates, which no UTF-8 text can hold)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _broken(path: Path) -> str | None:
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return None


def find_images(root: Path | str, split: str = "train") -> list[Path]:
    """PNG paths under ``root/<split>/DCM``, relative to that folder, sorted; refuses a
    folder that breaks the layout's rules (``scan_images``), naming the files."""
    listing = scan_images(root, split)
    if listing.problems:
        n = len(listing.problems)
        shown = "; ".join(f"{printable(p)}: {m}" for p, m in listing.problems[:3])
        more = f" (and {n - 3} more)" if n > 3 else ""
        raise DataLayoutError(
            f"{n} file(s) in {listing.dcm} break the layout (docs/format.md), and no image "
            f"is skipped silently: {shown}{more}. Fix them; "
            f"`python scripts/verify_data.py {Path(root)}` lists every one"
        )
    return listing.images


def find_jsons(folder: Path | str) -> list[Path]:
    """Annotation JSON paths ``folder/<ID>/<stem>.json``, relative to ``folder``, sorted."""
    folder = Path(folder)
    return sorted(p.relative_to(folder) for p in folder.glob("*/*.json"))


def discover(root: Path | str, split: str = "train", exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Table of one split: patient, rel (ID/name), name, image_path, json_path.

    ``json_path`` is empty for the test split. A folder that breaks the layout's rules
    (``scan_images``), training images without a JSON (or JSONs without an image) and an
    empty split are errors that name the root and the files. ``exclude`` drops training
    images given by file name, stem or relative path (the real images with known
    annotation errors).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} ({root.resolve()}) does not exist. {PHANTOM_HINT}")
    images = find_images(root, split)
    dcm = root / split / "DCM"
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
    kept = apply_exclude(df, exclude)
    if kept.empty:  # not "unusable": the user's list took them all
        raise DataLayoutError(
            f"data.exclude excludes every one of the {len(df)} {split} images of {root}: "
            "nothing is left; shorten data.exclude"
        )
    return kept


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
