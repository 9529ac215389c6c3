"""Integrity check of a data root: every problem, each with its file, reported together.

Read-only. Checks the layout (the rules of ``layout.scan_images``, which training and
inference apply too; image/JSON pairs; a test folder with images), every PNG (decodes,
complete; its size by ``images.size_problems``, which inference applies too; a size other
than the others' is a warning, ``images.size_warnings``) and every
annotation (see ``annotations.check_annotation``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from tqdm.auto import tqdm

from bonecomp.data.annotations import AnnotationError, check_annotation, read_json
from bonecomp.data.images import (
    ImageReadError,
    printable,
    read_image,
    size_problems,
    size_warnings,
)
from bonecomp.data.layout import PHANTOM_HINT, annotation_dir, find_jsons, scan_images

_PNG_END = b"IEND\xaeB`\x82"


@dataclass
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class Report:
    root: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # worth a look, not a problem
    patients: int = 0
    images: int = 0
    annotations: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (
            f"{state}: {self.root}: {self.patients} patients, {self.images} images, "
            f"{self.annotations} annotations"
        )


def verify_dataset(root: Path | str, workers: int = 4, progress: bool = True) -> Report:
    """Check a data root laid out as in docs/format.md; never modifies it."""
    root = Path(root)
    report = Report(root)
    if not root.is_dir():
        report.problems.append(Problem(str(root), f"not a directory. {PHANTOM_HINT}"))
        return report
    splits = [s for s in ("train", "test") if (root / s / "DCM").is_dir()]
    listings = {s: scan_images(root, s) for s in splits}  # the rules training and inference apply
    if "train" not in splits:
        report.problems.append(Problem(str(root / "train" / "DCM"), f"missing. {PHANTOM_HINT}"))
    test_dcm = root / "test" / "DCM"
    if "test" not in splits:
        report.problems.append(Problem(str(test_dcm), "missing (the test images to predict)"))
    elif not listings["test"].images:
        report.problems.append(Problem(str(test_dcm), "holds no PNG images (expected ID*/*.png)"))
    jdir = annotation_dir(root)
    if "train" in splits and not jdir.is_dir():
        report.problems.append(Problem(str(jdir), "missing (training annotations)"))

    images: list[tuple[str, Path]] = []  # (split, path)
    for split, listing in listings.items():
        images += [(split, listing.dcm / r) for r in listing.images]
        report.problems += [Problem(printable(p), m) for p, m in listing.problems]

    pairs: dict[Path, Path] = {}
    if "train" in splits and jdir.is_dir():
        dcm = root / "train" / "DCM"
        img_keys = {p.relative_to(dcm).with_suffix(""): p for s, p in images if s == "train"}
        json_keys = {r.with_suffix(""): jdir / r for r in find_jsons(jdir)}
        for key in sorted(img_keys.keys() - json_keys.keys()):
            report.problems.append(Problem(str(img_keys[key]), "image without annotation JSON"))
        for key in sorted(json_keys.keys() - img_keys.keys()):
            report.problems.append(Problem(str(json_keys[key]), "annotation JSON without image"))
        pairs = {img_keys[k]: json_keys[k] for k in img_keys.keys() & json_keys.keys()}

    paths = [p for _, p in images]
    with ThreadPoolExecutor(workers) as pool:  # cv2 decodes without the GIL
        shapes = list(
            tqdm(
                pool.map(_check_png, paths),
                total=len(paths),
                desc="verify images",
                unit="img",
                disable=not progress,
            )
        )
    for p, (_, problem) in zip(paths, shapes, strict=True):
        if problem:
            report.problems.append(Problem(printable(p), problem))
    decoded = {p: shape for p, (shape, _) in zip(paths, shapes, strict=True) if shape is not None}
    report.problems += [Problem(printable(p), m) for p, m in size_problems(decoded)]  # one rule
    report.warnings += [Problem(printable(p), m) for p, m in size_warnings(decoded)]

    shape_of = dict(zip(paths, (s for s, _ in shapes), strict=True))
    for img, js in sorted(pairs.items()):
        try:
            doc = read_json(js)
        except AnnotationError as e:
            report.problems.append(Problem(str(js), str(e).removeprefix(f"{js}: ")))
            continue
        hw = shape_of[img]
        report.problems += [Problem(str(js), m) for m in check_annotation(doc, hw)]
        anns = doc.get("annotations") if isinstance(doc, dict) else None
        report.annotations += len(anns) if isinstance(anns, list) else 0

    report.patients = len({(s, p.parent.name) for s, p in images})
    report.images = len(images)
    return report


def _check_png(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(height, width) of a decodable, complete PNG, else (None, what is wrong)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(os.path.getsize(path) - 8, 0))
            tail = f.read(8)
    except OSError as e:
        return None, f"unreadable ({e})"
    if head != b"\x89PNG\r\n\x1a\n":
        return None, "not a PNG file"
    if tail != _PNG_END:
        return None, "truncated PNG (no IEND chunk at the end)"
    try:
        img = read_image(path, cv2.IMREAD_UNCHANGED)
    except ImageReadError:
        return None, "PNG does not decode"
    if img.dtype != "uint8":
        return None, f"PNG is {img.dtype}, expected 8-bit"
    return img.shape[:2], None
