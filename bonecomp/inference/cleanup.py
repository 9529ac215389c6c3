"""Per-class clean-up of the thresholded masks, each rule kept only where OOF Dice gains.

Rules (nnU-Net's "keep the largest connected component", decided per class on the
cross-validation, plus two relatives):

- ``largest``: keep only the largest 8-connected component (a stray island of a bone,
  e.g. a fingertip blob beside the wrong finger, costs Dice on every image it is in);
- ``min_area:<pixels>``: drop the components smaller than that many source pixels;
- ``fill_holes``: fill the background enclosed by the mask (4-connected background).

The rules are a registry, ``CLEANUP_RULES``, in their order of application (components
first, then holes, then the ones registered later): ``register_cleanup`` adds one, also
from a user's module under ``extensions`` (docs/extending.md), and ``infer.cleanup_rules``
(or ``tune_cleanup.py --rules``) names the ones tuning tries. Each works on the
class's ``SparseMask`` crop, its bounding box: the mask is empty outside it, so its
components are those of the whole image, and background touching the box's edge reaches
the image's edge through the empty outside, so the holes are those of the whole image too.
At 2048 px the cost is a connected-component pass over a bone's box, not over the image.

Tuning (``tune_cleanup``) scores every combination of (nothing | largest | min_area per
area of the grid) x (fill_holes or not) x (each other registered rule or not) on each OOF
image, at its source size, with the thresholds and class weights of the thresholds file
in use, exactly as the thresholds tuning scores Dice (``thresholds.image_dice``). A class
takes the best combination whose every rule gains more than ``min_gain`` over the same
combination without it; otherwise none. No rule is the first candidate, so tuning never
lowers the OOF Dice.

The choice lives in the thresholds file (``postfile.PostFile``) as ``cleanup: {class
name: [rule, ...]}`` (only the classes with rules), beside the thresholds, class weights
and runs it was tuned at. Re-tuning thresholds or weights keeps it only where they come
out the same, else drops it and the tuning script says so in one line: run the clean-up
tuning again after them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from bonecomp.classes import CLASSES
from bonecomp.config import Config, ConfigError
from bonecomp.data.truth import GroundTruth
from bonecomp.inference.class_weights import resolve_class_weights
from bonecomp.inference.postfile import PostFile
from bonecomp.inference.postprocess import (
    SparseMask,
    SparseMasks,
    overlap_counts,
    trim,
    upsample_threshold,
)
from bonecomp.inference.thresholds import oof_items, resolve_thresholds
from bonecomp.metrics import DiceTable, dice_from_counts
from bonecomp.registry import Registry
from bonecomp.runs import MemberSpec, thresholds_in_use

AREAS: tuple[int, ...] = (64, 256, 1024, 4096)  # source pixels (images are ~2048 px)
MIN_GAIN = 1e-3  # as the thresholds tuning


@dataclass(frozen=True)
class CleanupRule:
    """A registered clean-up rule: ``apply(mask)`` maps a class's bool box crop to a bool
    mask of the same shape (``apply(mask, pixels)`` when ``sized``: written
    ``<name>:<pixels>``, tuned at each area of the grid). Tuning crosses the rules of
    different ``group``s and tries the rules of one group as alternatives (None: a group
    of its own)."""

    apply: Callable[..., np.ndarray]
    sized: bool = False
    group: str | None = None


CLEANUP_RULES: Registry[CleanupRule] = Registry("clean-up rule", "infer.cleanup_rules")


def register_cleanup(
    name: str,
    apply: Callable[..., np.ndarray] | None = None,
    *,
    sized: bool = False,
    group: str | None = None,
    replace: bool = False,
):
    """Add the clean-up rule ``name``: ``register_cleanup(name, apply)``, or
    ``@register_cleanup(name)`` over ``apply(mask) -> mask``; see ``CleanupRule``. Returns
    ``apply``. Rules apply in registration order. A name already registered is refused
    (``ValueError``) unless ``replace=True``."""

    def add(fn: Callable[..., np.ndarray]):
        CLEANUP_RULES.register(name, CleanupRule(fn, sized, group), replace=replace)
        return fn

    return add if apply is None else add(apply)


@dataclass(frozen=True, order=True)
class Rule:
    """One clean-up rule in use; ``area`` only for a sized one (``min_area``). Sorting
    gives the order of application (the rule's place in ``CLEANUP_RULES``)."""

    rank: int
    area: int = 0

    @property
    def name(self) -> str:
        return CLEANUP_RULES.names()[self.rank]

    @property
    def kind(self) -> CleanupRule:
        return CLEANUP_RULES.get(self.name)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.area}" if self.kind.sized else self.name

    @classmethod
    def make(cls, name: str, area: int = 0, key: str | None = None) -> Rule:
        """The rule ``name`` (an unknown one: the registry's ``ConfigError`` naming ``key``)."""
        kind = CLEANUP_RULES.get(name, key)
        return cls(CLEANUP_RULES.names().index(name), area if kind.sized else 0)

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (a class's bool box crop) with this rule applied."""
        kind = self.kind
        out = kind.apply(mask, self.area) if kind.sized else kind.apply(mask)
        out = np.asarray(out, dtype=bool)
        if out.shape != mask.shape:
            raise ValueError(
                f"clean-up rule {self.name!r} returned a {out.shape} mask for a {mask.shape} one"
            )
        return out


def parse_rule(text: object, key: str | None = None) -> Rule:
    """A rule as the thresholds file writes it: ``<name>``, or ``<name>:<pixels>`` (an
    integer >= 1) for a sized one (``min_area:64``). An unknown name is the registry's
    ``ConfigError`` naming ``key``; a missing or extra argument a ``ValueError``."""
    name, _, arg = text.partition(":") if isinstance(text, str) else (text, "", "")
    rule = Rule.make(name, key=key)  # type: ignore[arg-type]
    where = f"{key}: " if key else ""
    if rule.kind.sized:
        if not (arg.isdigit() and int(arg) >= 1):
            raise ValueError(f"{where}clean-up rule {name!r} is written {name}:<pixels> "
                             f"(an integer >= 1), got {text!r}")  # fmt: skip
        return Rule.make(name, int(arg))
    if arg:
        raise ValueError(f"{where}clean-up rule {name!r} takes no argument, got {text!r}")
    return rule


def clean_crop(crop: np.ndarray, rules: Sequence[Rule]) -> np.ndarray:
    """A bool mask (a class's box) with ``rules`` applied, in their order of application."""
    return _variants(crop, [tuple(rules)])[0]


def _largest(mask: np.ndarray) -> np.ndarray:
    return _variants(mask, [(LARGEST,)])[0]


def _min_area(mask: np.ndarray, pixels: int) -> np.ndarray:
    return _variants(mask, [(Rule.make("min_area", pixels),)])[0]


def _variants(crop: np.ndarray, combos: Sequence[tuple[Rule, ...]]) -> list[np.ndarray]:
    """``crop`` cleaned by each combination of rules. The built-in component rules
    (``largest``, ``min_area``) that come first share one labelling (OpenCV), so trying
    many combinations costs one labelling pass; every other rule is called."""
    crop = np.ascontiguousarray(crop, dtype=bool)
    labels = area = None
    out = []
    for combo in combos:
        mask = crop
        rest = sorted(combo)
        comp = []
        while rest and rest[0].kind.apply in _COMPONENTS:
            comp.append(rest.pop(0))
        if comp and crop.any():
            if labels is None:
                _, labels, stats, _ = cv2.connectedComponentsWithStats(
                    crop.view(np.uint8), connectivity=8
                )
                area = stats[:, cv2.CC_STAT_AREA].copy()
                area[0] = 0  # label 0 is the background
            keep = area > 0
            for r in comp:
                if r.kind.apply is _min_area:
                    keep &= area >= r.area
                elif keep.any():  # largest (of what is left); ties: the first label
                    biggest = int(np.argmax(np.where(keep, area, -1)))
                    keep = np.zeros_like(keep)
                    keep[biggest] = True
            mask = keep[labels]
        for r in rest:
            if mask.any():
                mask = r(mask)
        out.append(mask)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool, a class's box) with the background it encloses filled: the
    4-connected background components that do not touch the box's edge.

    One OpenCV labelling pass; by hand because OpenCV has no fill-holes and SciPy's
    ``binary_fill_holes`` (iterated dilation from the edge) took 5x longer on a bone's
    box at 2048 px (7.6 against 1.4 ms on an 800 x 400 box), the same result."""
    _, labels = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    outside = np.zeros(int(labels.max()) + 1, bool)
    outside[edge] = True
    outside[0] = True  # label 0: the mask itself
    return mask | ~outside[labels]


_COMPONENTS = (_largest, _min_area)  # the rules ``_variants`` runs on one labelling
register_cleanup("largest", _largest, group="components")
register_cleanup("min_area", _min_area, sized=True, group="components")
register_cleanup("fill_holes", fill_holes, group="holes")
LARGEST, FILL = Rule.make("largest"), Rule.make("fill_holes")


def clean_mask(mask: SparseMask, rules: Sequence[Rule]) -> SparseMask:
    """One class's sparse mask cleaned inside its box, cut to its new box (same device)."""
    if not rules or mask.crop.numel() == 0:
        return mask
    crop = mask.crop.cpu().numpy()  # OpenCV works on host arrays
    out = trim(clean_crop(crop, rules), mask.y0, mask.x0)
    return SparseMask(out.y0, out.x0, out.crop.to(mask.crop.device))


@dataclass
class Cleanup:
    """The chosen rules per class index; applied to an image's masks by calling it."""

    rules: dict[int, tuple[Rule, ...]]

    def __call__(self, masks: SparseMasks) -> SparseMasks:
        if not self.rules:
            return masks
        out = [clean_mask(m, self.rules.get(c, ())) for c, m in enumerate(masks.masks)]
        return SparseMasks(masks.shape, out)

    @property
    def table(self) -> dict[str, list[str]]:
        """What the thresholds file stores: {class name: [rule labels]}."""
        return {CLASSES[c]: [r.label for r in rs] for c, rs in sorted(self.rules.items()) if rs}

    @classmethod
    def from_table(cls, table: dict[str, Sequence[str]]) -> Cleanup:
        """From {class name: [rule, ...]}; a name outside ``CLASSES`` or an unknown rule is
        a ``ValueError``."""
        rules = {}
        for name, labels in table.items():
            if name not in CLASSES:
                raise ValueError(f"{name!r} is not a class of bonecomp/classes.py")
            key = f"cleanup.{name}"
            rules[CLASSES.index(name)] = tuple(sorted(parse_rule(v, key) for v in labels))
        return cls(rules)


# --------------------------------------------------------------------------- tuning
def candidates(
    areas: Sequence[int] = AREAS, rules: Sequence[str] | None = None, key: str = "--rules"
) -> list[tuple[Rule, ...]]:
    """Every combination tried per class: () first, then the groups of ``CleanupRule``
    crossed, each as nothing or one of its rules (a sized one at each of ``areas``): (nothing
    | largest | min_area per area) x (fill_holes or not) x (each other rule or not).
    ``rules``: the kinds tried (None: every registered one); an unknown one is the registry's
    ``ConfigError`` naming ``key``."""
    names = CLEANUP_RULES.names() if rules is None else list(rules)
    CLEANUP_RULES.check(names, key)
    names = [n for n in CLEANUP_RULES.names() if n in names]  # in the order of application
    sized = [n for n in names if CLEANUP_RULES.get(n).sized]
    if sized and (not areas or any(int(a) < 1 for a in areas)):
        raise ConfigError(f"--areas: {', '.join(sized)} needs areas >= 1 pixel, got {list(areas)}")
    groups: dict[str, list[tuple[Rule, ...]]] = {}
    for name in names:
        kind = CLEANUP_RULES.get(name)
        sizes = sorted({int(a) for a in areas}) if kind.sized else [0]
        groups.setdefault(kind.group or name, []).extend((Rule.make(name, a),) for a in sizes)
    combos: list[tuple[Rule, ...]] = [()]
    for options in groups.values():
        combos = [c + o for o in [(), *options] for c in combos]
    return combos


def image_cleanup_dice(
    masks: SparseMasks, truth: list, combos: Sequence[tuple[Rule, ...]]
) -> np.ndarray:
    """Dice (C, K) of one image's masks with each combination of rules, against its truth
    crops, counted like ``thresholds.image_dice``."""
    per_class = []
    for m, t in zip(masks.masks, truth, strict=True):
        if m.crop.numel() == 0:
            variants = [m] * len(combos)
        else:
            crops = _variants(m.crop.cpu().numpy(), combos)
            variants = [SparseMask(m.y0, m.x0, torch.from_numpy(v)) for v in crops]
        counts = overlap_counts(variants, [t] * len(variants))
        per_class.append(dice_from_counts(*counts))
    return np.stack(per_class)


def cleanup_dice(
    items: Iterable[tuple[torch.Tensor, list, tuple[int, int]]],
    thresholds: Sequence[float],
    combos: Sequence[tuple[Rule, ...]],
) -> tuple[np.ndarray, int]:
    """Mean Dice (C, K) over OOF images; items are (probs (C,h,w), truth crops, (H, W)) as
    ``thresholds.oof_items`` yields them, thresholded exactly as inference does."""
    total, n = None, 0
    for probs, truth, hw in items:
        masks = upsample_threshold(probs, hw, thresholds, logits=False)
        d = image_cleanup_dice(masks, truth, combos)
        total = d if total is None else total + d
        n += 1
    if n == 0:
        raise ValueError("no out-of-fold images to tune on")
    return total / n, n


@dataclass
class CleanupResult:
    combos: list[tuple[Rule, ...]]
    dice: np.ndarray  # (C, K) mean OOF Dice per class and combination
    pick: np.ndarray  # (C,) index into combos; 0 = no clean-up
    before: DiceTable
    after: DiceTable

    @property
    def cleanup(self) -> Cleanup:
        return Cleanup({c: self.combos[k] for c, k in enumerate(self.pick) if k})

    def format(self) -> str:
        """The table: class, rule(s) kept ('-': none), OOF Dice before and after."""
        rows = [f"{'class':<12} {'rule':<24} {'before':>8} {'after':>8}"]
        for c, name in enumerate(CLASSES):
            rule = " + ".join(r.label for r in self.combos[self.pick[c]]) or "-"
            b, a = self.before.per_class[c], self.after.per_class[c]
            rows.append(f"{name:<12} {rule:<24} {b:8.4f} {a:8.4f}")
        rows.append(f"{'mean':<12} {'':<24} {self.before.mean:8.4f} {self.after.mean:8.4f}")
        return "\n".join(rows)


def choose_cleanup(
    dice: np.ndarray, combos: Sequence[tuple[Rule, ...]], min_gain: float = MIN_GAIN
) -> CleanupResult:
    """Per class, the best combination in which every rule gains more than ``min_gain``
    over the combination without it (so a lone rule must beat no clean-up by that much);
    none when there is no such combination."""
    combos = [tuple(sorted(c)) for c in combos]
    if not combos or combos[0]:
        raise ValueError("the first candidate must be no clean-up")
    index = {c: k for k, c in enumerate(combos)}
    pick = np.zeros(len(dice), np.int64)
    for c, row in enumerate(dice):
        for k in np.argsort(-row, kind="stable"):
            if k == 0:
                break
            without = [index.get(tuple(r for r in combos[k] if r != x)) for x in combos[k]]
            if all(w is not None and row[k] - row[w] > min_gain for w in without):
                pick[c] = k
                break
    rows = np.arange(len(dice))
    return CleanupResult(
        list(combos),
        dice,
        pick,
        DiceTable(dice[:, 0], n_images=0),
        DiceTable(dice[rows, pick], n_images=0),
    )


def tune_cleanup(
    cfg: Config,
    members: Sequence[MemberSpec],
    areas: Sequence[int] = AREAS,
    rules: Sequence[str] | None = None,
    min_gain: float = MIN_GAIN,
    out: Path | str | None = None,
    progress: bool = True,
) -> tuple[CleanupResult, Path]:
    """Choose each class's clean-up on the members' OOF maps, with the thresholds and
    class weights inference would use (the thresholds file in use, else
    ``infer.threshold``), and store it in that file (or a copy at ``out``). ``rules``: the
    kinds tried (None: ``infer.cleanup_rules``, where null is every registered one)."""
    key = "--rules" if rules is not None else "infer.cleanup_rules"
    rules = list(rules if rules is not None else cfg.infer.cleanup_rules or CLEANUP_RULES)
    combos = candidates(areas, rules, key)  # a bad rule or area: before reading any OOF map
    src = thresholds_in_use(cfg)
    thresholds, _ = resolve_thresholds(cfg, members)
    _, table, _ = resolve_class_weights(cfg, members)
    items = oof_items(members, GroundTruth.of(cfg.data), progress, class_weights=table)
    dice, n = cleanup_dice(items, thresholds, combos)
    result = choose_cleanup(dice, combos, min_gain)
    result.before.n_images = result.after.n_images = n
    runs = [str(m.run) for m in members]
    post = PostFile.read(src) if src.is_file() else PostFile(list(thresholds), runs)
    post = post.with_cleanup(
        result.cleanup.table,
        runs,
        cleanup_tried={"rules": list(rules), "areas": sorted({int(a) for a in areas})},
        cleanup_min_gain=min_gain,
        cleanup_oof_images=n,
        cleanup_dice_before=result.before.mean,
        cleanup_dice_after=result.after.mean,
    )
    path = Path(out) if out else src
    return result, post.write(path)


# ------------------------------------------------------------------------- inference
def read_cleanup(path: Path | str) -> Cleanup | None:
    """The ``cleanup`` table of a thresholds file, or None when it has none. A damaged
    table, an unknown rule or classes other than ``CLASSES`` is a ``RunError`` naming the
    file and the key (``PostFile.read``)."""
    table = PostFile.read(path).cleanup
    return None if table is None else Cleanup.from_table(table)


def resolve_cleanup(cfg: Config) -> tuple[Cleanup | None, str]:
    """The clean-up of the thresholds file in use (None: none) and a line saying so."""
    path = thresholds_in_use(cfg)
    clean = read_cleanup(path) if path.is_file() else None
    if clean is None or not clean.rules:
        return None, "none"
    rules = ", ".join(f"{k} {'+'.join(v)}" for k, v in clean.table.items())
    return clean, f"{rules} (from {path})"
