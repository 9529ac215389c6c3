"""The submission CSV: write it atomically, validate it, score it.

Format (docs/format.md): header ``image_name,class,rle``; test images in sorted relative-path
order, each with 29 consecutive rows in class order; bare file names; RLE as in
``bonecomp.rle`` (empty field for an empty mask).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bonecomp import rle
from bonecomp.classes import CLASSES, NUM_CLASSES
from bonecomp.data.annotations import AnnotationError, load_annotation
from bonecomp.data.layout import find_jsons
from bonecomp.data.rasterize import class_crop
from bonecomp.fileio import output_errors, remove_stale_temps, temp_path
from bonecomp.metrics import DiceTable, dice_from_counts, summarize

HEADER = ("image_name", "class", "rle")
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors put at the start of a CSV


class SubmissionError(ValueError):
    """A submission CSV that does not follow the format; the message lists the problems."""


class SubmissionWriter:
    """Streams rows to a temporary file and renames it into place on ``close``.

    Used as a context manager: if the block raises, the temporary file is removed and no
    file appears under the final name. A read-only folder or a full disk raises
    ``fileio.OutputError`` naming the folder, and removes the temporary file.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        with output_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path.parent)  # left by a killed run
            self._f = open(self.tmp, "w", newline="")  # noqa: SIM115 - closed in close()/abort()
        self._w = csv.writer(self._f, lineterminator="\n")
        self.rows = 0
        self.report: CheckReport | None = None
        self._write([HEADER])

    def _write(self, rows) -> None:
        try:
            with output_errors(self.path):
                self._w.writerows(rows)
        except BaseException:
            self.abort()
            raise

    def add(self, image_name: str, rles: Sequence[str]) -> None:
        """The 29 rows of one image, ``rles`` in class order."""
        if len(rles) != NUM_CLASSES:
            raise ValueError(f"{image_name}: {len(rles)} RLE strings, expected {NUM_CLASSES}")
        self._write((image_name, name, r) for name, r in zip(CLASSES, rles, strict=True))
        self.rows += NUM_CLASSES

    def close(self, check: Callable[[Path], CheckReport] | None = None) -> Path:
        """Finish the file and rename it into place.

        With ``check``, the finished temporary file is validated first; an invalid one is
        kept as ``<name>.invalid.csv`` (never under the final, uploadable name) and
        ``SubmissionError`` lists its problems.
        """
        try:
            with output_errors(self.path):
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
        except BaseException:
            self.abort()
            raise
        report = self.report = check(self.tmp) if check else None
        if report is not None and not report.ok:
            bad = self.path.with_suffix(".invalid.csv")
            os.replace(self.tmp, bad)
            raise SubmissionError(
                f"{bad}: the written CSV is invalid:\n  " + "\n  ".join(report.problems[:20])
            )
        os.replace(self.tmp, self.path)
        if report is not None:
            report.path = self.path
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file (a full disk may fail the close: ignored)."""
        with contextlib.suppress(OSError):
            self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> SubmissionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_submission(path: Path | str, rows: Sequence[tuple[str, Sequence[str]]]) -> Path:
    """Write (image_name, 29 RLE strings) pairs atomically."""
    with SubmissionWriter(path) as w:
        for name, rles in rows:
            w.add(name, rles)
    return Path(path)


# ---------------------------------------------------------------------------- validation
@dataclass
class CheckReport:
    """``problems`` make the file invalid; ``warnings`` are legal but probably mistakes
    (a class never predicted, a byte-order mark)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: int = 0
    images: int = 0
    empty: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if not self.ok:
            return f"INVALID {self.path}: {len(self.problems)} problem(s)"
        warned = f", {len(self.warnings)} warning(s)" if self.warnings else ""
        return (
            f"OK {self.path}: {self.rows} rows, {self.images} images, {self.empty} empty "
            f"masks{warned}"
        )


def read_submission(path: Path | str) -> pd.DataFrame:
    """The CSV as strings; an empty RLE field stays "" (pandas would make it NaN).

    A leading UTF-8 byte-order mark is dropped explicitly (``utf-8-sig``), as pandas-based
    graders do; ``validate_submission`` warns about it.
    """
    return pd.read_csv(
        path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig"
    )


def validate_submission(
    path: Path | str,
    image_names: Sequence[str],
    shapes: list[tuple[int, int]] | tuple[int, int] = (2048, 2048),
    max_problems: int = 200,
) -> CheckReport:
    """Check a CSV against the expected test images (in submission order).

    Every problem is reported with its line number (the header is line 1): header,
    row count, image names and their order, class order, duplicate rows, malformed RLE
    or runs outside the image (``shapes``: one (H, W), or one per expected image: a row
    is judged against the size of the image it names).

    Warnings, which leave the file valid: a leading UTF-8 byte-order mark (accepted: the
    header is read without it), a class whose every mask is empty, a file whose every
    mask is empty.
    """
    path = Path(path)
    report = CheckReport(path)
    add = report.problems.append
    try:
        with open(path, "rb") as f:
            if f.read(len(BOM)) == BOM:
                report.warnings.append(
                    "the file starts with a UTF-8 byte-order mark (BOM): accepted, the header "
                    "is read without it, but a grader reading raw bytes may not; save it as "
                    "UTF-8 without BOM"
                )
    except OSError:
        pass  # reported below as "cannot read CSV"
    try:
        df = read_submission(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        add(f"cannot read CSV: {e}")
        return report
    if tuple(df.columns) != HEADER:
        add(f"line 1: header {','.join(map(str, df.columns))!r}, expected {','.join(HEADER)!r}")
        return report
    n_expected = len(image_names) * NUM_CLASSES
    report.rows = len(df)
    if len(df) != n_expected:
        add(
            f"{len(df)} rows, expected {n_expected} "
            f"({len(image_names)} test images x {NUM_CLASSES} classes)"
        )
    per_image = isinstance(shapes, list)
    # a row is judged against the size of the test image it names; by position only when
    # the name is not a test image (rows missing or moved must not borrow another's size)
    shape_of = dict(zip(image_names, shapes, strict=False)) if per_image else {}
    names, classes, rles = df["image_name"].tolist(), df["class"].tolist(), df["rle"].tolist()
    dup = df.duplicated(["image_name", "class"], keep="first").to_numpy()
    seen, empty = np.zeros(NUM_CLASSES, int), np.zeros(NUM_CLASSES, int)  # per class
    for i, (name, cls, code) in enumerate(zip(names, classes, rles, strict=True)):
        if len(report.problems) >= max_problems:
            add(f"... stopped after {max_problems} problems")
            break
        line = i + 2
        k, c = divmod(i, NUM_CLASSES)
        if dup[i]:
            add(f"line {line}: duplicate row for {name} {cls}")
        if k < len(image_names) and name != image_names[k]:
            add(f"line {line}: image_name {name!r}, expected {image_names[k]!r}")
        if cls != CLASSES[c]:
            add(f"line {line}: class {cls!r}, expected {CLASSES[c]!r} (class order)")
        shape = shape_of.get(name, shapes[min(k, len(shapes) - 1)]) if per_image else shapes
        try:
            starts, _ = rle.string_to_runs(code, shape)
        except rle.RLEError as e:
            add(f"line {line}: bad RLE for {name} {cls}: {e}")
            continue
        report.empty += len(starts) == 0
        if cls == CLASSES[c]:
            seen[c] += 1
            empty[c] += len(starts) == 0
    report.images = len(dict.fromkeys(names))
    present = set(names)
    missing = [n for n in image_names if n not in present]
    if missing:
        add(f"{len(missing)} test image(s) have no rows, e.g. {missing[:3]}")
    _warn_empty(report, seen, empty)
    return report


def _warn_empty(report: CheckReport, seen: np.ndarray, empty: np.ndarray) -> None:
    """Legal but suspicious: a class never predicted (or nothing predicted at all)."""
    if report.rows and report.empty == report.rows:
        report.warnings.append(
            f"every mask in the file is empty ({report.rows} rows): the model predicted "
            "nothing; check the checkpoint and the thresholds"
        )
        return
    for c in np.flatnonzero((seen > 0) & (empty == seen)):
        report.warnings.append(
            f"class {CLASSES[c]}: every mask is empty ({seen[c]} images); check its threshold"
        )


# ---------------------------------------------------------------------------- scoring
def label_index(labels_dir: Path | str) -> dict[str, Path]:
    """Bare image file name (``<stem>.png``) -> annotation JSON under ``labels_dir/ID*/``."""
    index: dict[str, Path] = {}
    for rel in find_jsons(labels_dir):
        index[rel.with_suffix(".png").name] = Path(labels_dir) / rel
    return index


def score_submission(
    path: Path | str,
    labels_dir: Path | str,
    shapes: dict[str, tuple[int, int]] | tuple[int, int],
    progress: bool = True,
) -> tuple[DiceTable, np.ndarray]:
    """Competition Dice of a CSV against ground-truth JSONs.

    ``shapes``: each image's (H, W) by name (the PNGs' shapes, ``png_shape``), or one
    shape for all. Rows must be in the submission's order (``validate_submission``);
    anything else is refused rather than scored against the wrong class.

    Works in run space: the truth of each class is drawn exactly in its bounding box and
    turned into runs; the intersection with the predicted runs is counted directly, so no
    full-size mask is ever made. Returns the table and the (images, classes) Dice array.
    """
    df = read_submission(path)
    labels = label_index(labels_dir)
    names = list(dict.fromkeys(df["image_name"]))
    missing = [n for n in names if n not in labels]
    if missing:
        raise FileNotFoundError(
            f"{labels_dir}: no label JSON for {len(missing)} image(s), e.g. {missing[:3]}"
        )
    expected = [(n, c) for n in names for c in CLASSES]
    if list(zip(df["image_name"], df["class"], strict=True)) != expected:
        raise SubmissionError(f"{path}: rows are not 29 per image in class order; validate it")
    codes = df["rle"].to_numpy().reshape(len(names), NUM_CLASSES)
    dice = np.zeros((len(names), NUM_CLASSES))
    for k, name in enumerate(tqdm(names, desc="score", unit="img", disable=not progress)):
        shape = shapes[name] if isinstance(shapes, dict) else shapes
        try:
            polys = load_annotation(labels[name])
        except AnnotationError as e:
            raise AnnotationError(f"scoring {name}: {e}") from e
        for c in range(NUM_CLASSES):
            pred = rle.string_to_runs(codes[k, c], shape)
            y0, x0, crop = class_crop(polys[c], shape)
            gt = rle.crop_to_runs(crop, y0, x0, shape)
            inter = rle.runs_overlap(pred, gt)
            dice[k, c] = dice_from_counts(inter, pred[1].sum(), gt[1].sum())
    return summarize(dice), dice


def compare_submissions(
    path_a: Path | str,
    path_b: Path | str,
    shapes: dict[str, tuple[int, int]] | tuple[int, int],
) -> DiceTable:
    """Per-class Dice of submission A against submission B (same images, same order);
    ``shapes`` as in ``score_submission``."""
    a, b = read_submission(path_a), read_submission(path_b)
    if a[["image_name", "class"]].values.tolist() != b[["image_name", "class"]].values.tolist():
        raise SubmissionError(f"{path_a} and {path_b} do not list the same image/class rows")
    dice = np.zeros(len(a))
    rows = zip(a["image_name"], a["rle"], b["rle"], strict=True)
    for i, (name, ra, rb) in enumerate(rows):
        shape = shapes[name] if isinstance(shapes, dict) else shapes
        runs_a, runs_b = rle.string_to_runs(ra, shape), rle.string_to_runs(rb, shape)
        inter = rle.runs_overlap(runs_a, runs_b)
        dice[i] = dice_from_counts(inter, runs_a[1].sum(), runs_b[1].sum())
    return summarize(dice.reshape(-1, NUM_CLASSES))
