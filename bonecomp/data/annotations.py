"""Read one competition annotation JSON into polygons keyed by class.

docs/format.md: polygons are mapped by ``label`` (never by list position); ``filename`` and
``metadata`` are wrong for the PNG and are ignored; extra keys are tolerated.
``check_annotation`` lists every problem of a document (the integrity check reports them
all); ``parse_annotation`` refuses a document that has any.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonecomp.classes import CLASS_TO_INDEX, CLASSES
from bonecomp.fileio import loads_json

# Most points one polygon may have. The largest bone's outline at 2048 px, one point per
# pixel, needs under 5,000; filling a self-crossing polygon (cv2.fillPoly) grows faster
# than the square of its points, whatever the image size (random points, measured: 5,000
# in 1 s, 10,000 in 4 s, 50,000 in 8 min), so an absurd count is refused by the check
# rather than left to run for hours.
MAX_POLYGON_POINTS = 10_000


class AnnotationError(ValueError):
    """An annotation file that cannot be turned into 29 polygons; the message names the file.

    ``problems`` lists what ``check_annotation`` found (empty when the file did not read),
    so a caller can word them its own way without checking the document again.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Polygons:
    """The 29 polygons of one image, in class order, as one flat array plus offsets.

    ``points[offsets[c]:offsets[c + 1]]`` is class ``c``'s (n, 2) array of ``x, y`` pixel
    coordinates in the source frame. One flat array keeps rasterizing vectorised and
    makes the cache small.
    """

    points: np.ndarray  # (N, 2) int32
    offsets: np.ndarray  # (C + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, c: int) -> np.ndarray:
        return self.points[self.offsets[c] : self.offsets[c + 1]]

    @classmethod
    def from_list(cls, polys: list[np.ndarray]) -> Polygons:
        offsets = np.zeros(len(polys) + 1, np.int64)
        offsets[1:] = np.cumsum([len(p) for p in polys])
        pts = [np.asarray(p, np.int32).reshape(-1, 2) for p in polys]
        points = np.concatenate(pts) if offsets[-1] else np.zeros((0, 2), np.int32)
        return cls(np.ascontiguousarray(points, np.int32), offsets)


def read_json(path: Path | str) -> dict:
    """Parse a JSON file; a read or parse error (a key given twice too) names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return loads_json(f.read())
    except (OSError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError, a key twice
        raise AnnotationError(f"{path}: cannot read JSON ({e})") from e


def check_annotation(doc: object, image_hw: tuple[int, int] | None = None) -> list[str]:
    """Every problem of an annotation document, as short messages (empty when valid).

    Checks: an ``annotations`` list; known, unique labels covering all 29 classes; each
    polygon 3 to ``MAX_POLYGON_POINTS`` points of finite integer ``[x, y]`` pairs, inside
    the image if its (height, width) is given.
    """
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        return ["missing 'annotations' list"]
    problems: list[str] = []
    labels = [a.get("label") if isinstance(a, dict) else None for a in anns]
    labels = [lab if isinstance(lab, str) else repr(lab) for lab in labels]  # e.g. a list
    for k, (ann, label) in enumerate(zip(anns, labels, strict=True)):
        if label not in CLASS_TO_INDEX:
            problems.append(f"annotation {k}: unknown label {label!r}")
            continue
        problems += [f"{label}: {p}" for p in _point_problems(ann.get("points"), image_hw)]
    dups = sorted(lab for lab, n in Counter(labels).items() if n > 1 and lab in CLASS_TO_INDEX)
    if dups:
        problems.append(f"duplicate label(s) {dups}")
    missing = [c for c in CLASSES if c not in set(labels)]
    if missing:
        problems.append(f"missing class(es) {missing}")
    return problems


def _point_problems(points: object, image_hw: tuple[int, int] | None) -> list[str]:
    if isinstance(points, list) and len(points) > MAX_POLYGON_POINTS:  # before any loop
        return [
            f"polygon has {len(points)} points, more than {MAX_POLYGON_POINTS} (a bone's "
            "outline needs a few hundred): simplify it, e.g. with cv2.approxPolyDP"
        ]
    if not isinstance(points, list) or not all(
        isinstance(p, list | tuple) and len(p) == 2 for p in points
    ):
        return ["points are not a list of [x, y] pairs"]
    problems = []
    if len(points) < 3:
        problems.append(f"polygon has {len(points)} point(s), needs at least 3")
    values = [v for p in points for v in p]
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
        return [*problems, "points hold non-numbers"]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        problems.append("non-finite point coordinates")
    elif any(isinstance(v, float) and not v.is_integer() for v in values):
        problems.append("non-integer point coordinates")
    elif image_hw is not None and values:
        h, w = image_hw
        xs, ys = values[0::2], values[1::2]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > w - 1 or max(ys) > h - 1:
            problems.append(
                f"points outside the {w}x{h} image (x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)})"
            )
    return problems


def parse_annotation(
    doc: object, path: Path | str = "<json>", image_hw: tuple[int, int] | None = None
) -> Polygons:
    """Turn a parsed annotation document into 29 polygons in class order.

    The document is checked once (``check_annotation``, with the image's (height, width)
    when given: points must then lie inside it); any problem raises ``AnnotationError``
    naming the file, its first problems in the message and all of them in ``problems``.
    """
    problems = check_annotation(doc, image_hw)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AnnotationError(f"{path}: " + "; ".join(problems[:3]) + more, problems)
    by_label = {a["label"]: a["points"] for a in doc["annotations"]}  # type: ignore[index]
    return Polygons.from_list([np.asarray(by_label[c]) for c in CLASSES])


def load_annotation(path: Path | str, image_hw: tuple[int, int] | None = None) -> Polygons:
    """Read and parse one annotation JSON file (see ``parse_annotation``)."""
    return parse_annotation(read_json(path), path, image_hw)
