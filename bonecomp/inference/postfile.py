"""The post-processing file ("thresholds file"): the one reader and writer of its JSON.

It holds what turns an ensemble's probabilities into the submission's masks, and what
each part was tuned on:

- ``thresholds`` (one per class) and ``runs`` (the run folders they were tuned on),
  written by ``tune_thresholds.py`` and ``tune_ensemble.py``;
- ``class_weights`` ``{experiment: [one weight per class]}``, by ``tune_ensemble.py``;
- ``cleanup`` ``{class name: [rule, ...]}``, by ``tune_cleanup.py``, with the thresholds,
  class weights and runs it was tuned at (``cleanup_thresholds``, ``cleanup_class_weights``,
  ``cleanup_runs``; a file of older code has none: its clean-up was tuned at the file's own);
- the tuning's other records (``grid``, ``oof_images``, ``dice_*``, ``cleanup_*``), kept
  as they are.

Re-tuning one part keeps the others that are still valid and says in one line what it
dropped and why (``PostFile.retuned``): a clean-up is valid at the thresholds, class
weights and models it was tuned at, nothing else. A bad file is a ``RunError`` of one line
naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bonecomp.classes import CLASSES
from bonecomp.fileio import loads_json, write_text
from bonecomp.inference.postprocess import as_thresholds
from bonecomp.runs import RunError, run_name

# what tuning thresholds or class weights records; replaced whenever they are re-tuned
TUNING_KEYS = ("grid", "weight_step", "min_share", "oof_images", "dice_before",
               "dice_thresholds_only", "dice_after")  # fmt: skip
_FIELDS = ("classes", "thresholds", "runs", "class_weights", "cleanup")
_BASIS = ("cleanup_thresholds", "cleanup_class_weights", "cleanup_runs")
RETUNE_CLEANUP = "re-tune it with scripts/tune_cleanup.py"

Weights = dict[str, list[float]]


@dataclass
class PostFile:
    """A post-processing file's content; ``info`` holds the tuning records (``grid``,
    ``dice_*``, ``cleanup_*`` ...), kept as written."""

    thresholds: list[float]
    runs: list[str] = field(default_factory=list)
    class_weights: Weights | None = None
    cleanup: dict[str, list[str]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path: Path | str) -> PostFile:
        """The validated file; any problem is a ``RunError`` naming ``path``."""
        doc = _read_doc(path)
        bad = f"thresholds file {path}:"
        if doc.get("classes") != list(CLASSES):
            raise RunError(
                f"{bad} its 'classes' differ from the competition's {len(CLASSES)} of "
                "bonecomp/classes.py (tuned for other classes); re-tune it"
            )
        try:
            thresholds = as_thresholds(doc["thresholds"], len(CLASSES))
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{bad} bad thresholds ({e})") from e
        runs = doc.get("runs", [])
        if not (isinstance(runs, list) and all(isinstance(r, str) for r in runs)):
            raise RunError(f"{bad} runs must be a list of run folders, got {runs!r}")
        weights = _class_weights(doc.get("class_weights"), bad)
        cleanup = _cleanup(doc.get("cleanup"), bad)
        info = {k: v for k, v in doc.items() if k not in _FIELDS}
        if cleanup is not None:  # older files: tuned at the file's own thresholds and weights
            info.setdefault("cleanup_thresholds", thresholds)
            info.setdefault("cleanup_class_weights", weights)
            info.setdefault("cleanup_runs", runs)
            try:
                info["cleanup_thresholds"] = as_thresholds(info["cleanup_thresholds"], len(CLASSES))
            except (TypeError, ValueError) as e:
                raise RunError(f"{bad} bad cleanup_thresholds ({e})") from e
            _class_weights(info["cleanup_class_weights"], bad, key="cleanup_class_weights")
        return cls(thresholds, list(runs), weights, cleanup, info)

    # ------------------------------------------------------------------ writing
    def write(self, path: Path | str) -> Path:
        """Write the file (JSON, atomic); the keys of older files keep their names."""
        doc = {"classes": list(CLASSES), "thresholds": [float(t) for t in self.thresholds]}
        if self.class_weights is not None:
            doc["class_weights"] = self.class_weights
        if self.cleanup is not None:
            doc["cleanup"] = self.cleanup
        doc.update(self.info)
        if self.runs:
            doc["runs"] = list(self.runs)
        return write_text(path, json.dumps(doc, indent=1, default=_plain))

    # ------------------------------------------------------------------ re-tuning
    def with_cleanup(self, table: dict[str, list[str]], runs: list[str], **records) -> PostFile:
        """This file with the clean-up ``table`` tuned now, at its thresholds and class
        weights on ``runs``; ``records``: the tuning's ``cleanup_*`` records."""
        info = {k: v for k, v in self.info.items() if not k.startswith("cleanup")}
        info.update(records, cleanup_thresholds=list(self.thresholds),
                    cleanup_class_weights=self.class_weights, cleanup_runs=list(runs))  # fmt: skip
        return replace(self, cleanup=table, info=info)

    def basis_of_cleanup(self) -> tuple[list[float], Weights | None, set[str]]:
        """(thresholds, class weights, run names) the clean-up was tuned at."""
        runs = self.info.get("cleanup_runs", self.runs)
        return (
            list(self.info.get("cleanup_thresholds", self.thresholds)),
            self.info.get("cleanup_class_weights", self.class_weights),
            {run_name(r) for r in runs},
        )


def retuned(
    old: PostFile | None,
    path: Path | str,
    thresholds: list[float],
    *,
    runs: list[str],
    class_weights: Weights | None = None,
    **records,
) -> tuple[PostFile, str]:
    """The file with newly tuned ``thresholds`` (and ``class_weights``, None: the members'
    own weights) on ``runs``, keeping the parts of ``old`` (the file at ``path`` being
    re-tuned) that are still valid; and one line saying what was kept or dropped and
    why ("" when ``old`` has nothing else).

    Old class weights are never kept: they were chosen together with the old thresholds.
    The clean-up is kept only when it was tuned at these very thresholds, class weights
    and models; its masks would differ otherwise."""
    new = PostFile([float(t) for t in thresholds], list(runs), class_weights, None, dict(records))
    if old is None:
        return new, ""
    notes, dropped = [], []
    if old.class_weights is not None and class_weights is None:
        dropped.append("its class weights (tuned together with the old thresholds; "
                       "scripts/tune_ensemble.py tunes both)")  # fmt: skip
    if old.cleanup is not None:
        ts, ws, names = old.basis_of_cleanup()
        differ = [what for what, same in (
            ("thresholds", np.allclose(ts, new.thresholds, rtol=0, atol=1e-9)),
            ("class weights", _same_weights(ws, class_weights)),
            ("models", names == {run_name(r) for r in runs}),
        ) if not same]  # fmt: skip
        if differ:
            dropped.append(f"its clean-up (tuned at other {' and '.join(differ)}; "
                           f"{RETUNE_CLEANUP})")  # fmt: skip
        else:
            notes.append("kept its clean-up (tuned at these thresholds, class weights and models)")
            new.cleanup = old.cleanup
            new.info.update({k: v for k, v in old.info.items() if k.startswith("cleanup")})
    if dropped:
        notes.append("dropped " + " and ".join(dropped))
    return new, f"{path}: {'; '.join(notes)}" if notes else ""


# ------------------------------------------------------------------ validation
def _read_doc(path: Path | str) -> dict:
    """The file's JSON object; unreadable, not JSON, a key given twice or not an object
    is a ``RunError`` naming the file."""
    try:
        doc = loads_json(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8, a key twice
        raise RunError(f"thresholds file {path}: cannot read ({e})") from e
    if not isinstance(doc, dict):
        raise RunError(f"thresholds file {path}: not a JSON object")
    return doc


def _class_weights(table: object, bad: str, key: str = "class_weights") -> Weights | None:
    """A ``class_weights`` table as numbers, or None; anything else is a ``RunError``."""
    if table is None:
        return None
    bad = f"{bad} {key} must map experiments to {len(CLASSES)} "
    if not isinstance(table, dict) or not table:
        raise RunError(bad + "weights each")
    for e, ws in table.items():
        if not (isinstance(ws, list) and len(ws) == len(CLASSES)):
            raise RunError(
                bad + f"weights each; {e!r} has {len(ws) if isinstance(ws, list) else ws!r}"
            )
    try:
        a = np.asarray(list(table.values()), np.float64)
    except (TypeError, ValueError) as e:
        raise RunError(bad + f"numbers each ({e})") from e
    if not np.isfinite(a).all() or (a < 0).any() or (a.sum(axis=0) <= 0).any():
        raise RunError(bad + "weights >= 0, with a positive sum for every class")
    return {e: [float(v) for v in ws] for e, ws in table.items()}


def _cleanup(table: object, bad: str) -> dict[str, list[str]] | None:
    """A ``cleanup`` table whose classes and rules are known, or None."""
    from bonecomp.inference.cleanup import parse_rule  # the rules register there

    if table is None:
        return None
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise RunError(f"{bad} cleanup must map class names to rule lists")
    others = [k for k in table if k not in CLASSES]
    if others:
        raise RunError(
            f"{bad} cleanup names {others}, not classes of bonecomp/classes.py "
            f"(tuned for other classes); {RETUNE_CLEANUP}"
        )
    for name, labels in table.items():
        for v in labels:
            try:
                parse_rule(v, f"cleanup.{name}")
            except ValueError as e:  # names the key: cleanup.<class>
                raise RunError(f"{bad} {e}") from e
    return {k: list(v) for k, v in table.items()}


def _same_weights(a: Weights | None, b: Weights | None) -> bool:
    if a is None or b is None:
        return a is b
    return sorted(a) == sorted(b) and all(np.allclose(a[e], b[e], rtol=0, atol=1e-9) for e in a)


def _plain(v: object) -> object:
    return np.asarray(v).tolist()
