"""One self-contained HTML page per experiment (all its folds) or per ensemble: learning
curves, the cross-validation table and heat map, the worst validation images, the effect
of the tuned thresholds, a submission's check and score, configs and the environment.

Everything a reader needs is in the file (PNG images embedded as base64, no script or
font from the network), so a report can be mailed, archived or opened offline. A leaf
module like ``viz``: nothing in the core imports it.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib.metadata
import io
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import jinja2
import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure

from bonecomp import rle
from bonecomp.classes import CLASSES, NUM_CLASSES
from bonecomp.config import Config, to_dict
from bonecomp.data.annotations import load_annotation
from bonecomp.data.cache import data_cache_dir
from bonecomp.data.folds import folds_path
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.data.truth import GroundTruth
from bonecomp.data.wrist import (
    ANGLE_CLASSES,
    BIN_EDGES,
    BIN_NAMES,
    angle_bin,
    table_angles,
    wrist_angle,
    wrist_angle_of_masks,
)
from bonecomp.fileio import write_text
from bonecomp.inference.class_weights import read_class_weights, resolve_class_weights
from bonecomp.inference.oof import has_oof
from bonecomp.inference.thresholds import grid_dice, oof_items, read_thresholds
from bonecomp.runs import (
    RunDir,
    RunError,
    ensemble_members,
    ensemble_report_path,
    report_path,
    thresholds_in_use,
)
from bonecomp.submission import (
    label_index,
    read_submission,
    score_submission,
    validate_submission,
)
from bonecomp.viz import oof_images

TEMPLATE = "report.html.j2"  # bonecomp/templates/
FOLD_DIR = re.compile(r"fold\d+")  # a fold folder (RunDir.fold reads the number)
PACKAGES = (
    "torch", "torchvision", "segmentation-models-pytorch", "timm", "albumentations",
    "opencv-python-headless", "numpy", "pandas", "numba", "scikit-learn", "matplotlib",
    "jinja2", "pyyaml",
)  # fmt: skip


# ------------------------------------------------------------------------ what the page shows
@dataclass
class Picture:
    """An embedded image and its caption."""

    uri: str
    caption: str = ""


@dataclass
class FoldView:
    fold: int
    path: str
    best_dice: float
    best_epoch: int | None
    epochs: int
    curves: Picture | None
    cut: str = ""  # why training stopped before its last epoch (summary.csv's ``stop``)


@dataclass
class ThresholdView:
    """Per-class OOF Dice at 0.5 and at the tuned thresholds."""

    path: str
    scope: str  # what the OOF Dice below were computed on
    tuned_on: list[str]
    rows: list[tuple[str, float, float, float]]  # class, threshold, before, after
    before: float
    after: float
    recorded: tuple[float | None, float | None]  # dice_before/dice_after in the file
    note: str = ""  # how the Dice were combined, or why they could not be computed


@dataclass
class AngleView:
    """The wrist-angle distribution per fold's validation images and of the test set
    (``bonecomp.data.wrist``): images per ``BIN_NAMES`` bin, the median and largest
    |angle|; ``rule`` is how the folds were split."""

    rule: str
    path: str
    bins: list[str]
    rows: list[tuple[str, int, list[int], float, float]]  # set, measured, per bin, median, max
    note: str = ""


@dataclass
class ExperimentView:
    name: str
    path: str
    folds: list[FoldView]
    classes: list[str]  # weakest first (mean over folds)
    table: list[tuple[int, float, list[float]]]  # fold, mean, Dice per class (weakest first)
    class_means: list[float]
    mean: float
    heatmap: Picture | None
    worst: list[Picture] = field(default_factory=list)
    thresholds: ThresholdView | None = None
    configs: list[tuple[str, str]] = field(default_factory=list)  # (fold folder, YAML)
    worst_classes: int = 0  # how many weakest classes the worst images show
    angles: AngleView | None = None  # wrist angle per fold (None: no saved config)


@dataclass
class SubmissionView:
    path: str
    summary: str
    problems: list[str]
    angles: AngleView | None = None  # wrist angle of the predicted test masks
    score: float | None = None
    per_class: list[tuple[str, float]] = field(default_factory=list)  # weakest first
    labels: str | None = None


# ------------------------------------------------------------------------------ public API
def write_run_report(
    experiment_dir: Path | str,
    out: Path | str | None = None,
    n_images: int = 4,
    n_classes: int = 6,
    size: int = 480,
) -> Path:
    """Write ``runs/<experiment>/report.html`` for every trained fold of the experiment.

    ``n_images`` worst validation images are drawn with the ``n_classes`` weakest
    classes, ``size`` pixels wide. Returns the page's path.
    """
    experiment_dir = Path(experiment_dir)
    view = experiment_view(experiment_dir, n_images=n_images, n_classes=n_classes, size=size)
    out = Path(out) if out else report_path(experiment_dir)
    title = f"{view.name}: CV Dice {view.mean:.4f} over {len(view.folds)} fold(s)"
    return _render(out, title=title, experiments=[view])


def write_ensemble_report(
    cfg: Config,
    csv: Path | str | None = None,
    labels: Path | str | None = None,
    out: Path | str | None = None,
    checkpoints: Sequence[str | Path] = (),
    n_images: int = 4,
    size: int = 480,
) -> Path:
    """Write ``runs/report_<infer.name>.html`` for the config's ensemble (the members
    ``infer.py --ensemble`` uses, or ``checkpoints``): each experiment's folds, the
    thresholds' effect on the ensemble's OOF probabilities, and with ``csv`` the
    submission's check (and score against ``labels``)."""
    members = ensemble_members(cfg, ensemble=True, explicit=checkpoints)
    by_experiment: dict[Path, list[int]] = {}
    for m in members:
        if not FOLD_DIR.fullmatch(m.run.path.name):
            raise RunError(
                f"{m.checkpoint}: the report needs checkpoints inside "
                "<train.output_dir>/<experiment>/fold<k>/ (it reads the fold's files)"
            )
        by_experiment.setdefault(m.run.path.parent, []).append(m.run.fold)
    views = [
        experiment_view(path, folds, n_images=n_images, size=size, thresholds=False)
        for path, folds in by_experiment.items()
    ]
    tv, table = None, None
    tpath = thresholds_in_use(cfg)
    if tpath.is_file():
        ts, tuned_on = read_thresholds(tpath)
        try:  # the class weights inference would use (refused if tuned for other models)
            _, table, _ = resolve_class_weights(cfg, members)
            truth = GroundTruth.of(cfg.data)  # the cache's polygons, else the JSON
            items = oof_items(members, truth, progress=False, class_weights=table)
            dice, n = grid_dice(items, [0.5, ts])
        except RunError as e:  # e.g. a member without OOF files: the rest of the page helps
            tv = ThresholdView(
                str(tpath), scope="", tuned_on=tuned_on, rows=[], before=0.0, after=0.0,
                recorded=(None, None),
            )  # fmt: skip
            tv.note = f"OOF Dice not computed: {e}"
        else:
            before, after = dice[:, 0], dice[:, 1]
            how = "class-wise weighted" if table else "weighted"
            scope = f"the ensemble's {how} mean OOF probabilities ({n} images)"
            tv = _threshold_view(tpath, scope, tuned_on, ts, before, after)
            if table:
                tv.note = (
                    "weights and thresholds were tuned together (scripts/tune_ensemble.py): "
                    "before = the class weights at 0.5, after = the class weights at the "
                    "tuned thresholds"
                )
    sub = _submission_view(cfg, csv, labels) if csv else None
    weights = [
        (str(m.checkpoint), "per class (tuned)" if table else f"{m.weight:g}") for m in members
    ]
    config = ("resolved config", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    title = f"ensemble {cfg.infer.name}: {len(members)} member(s)"
    if sub and sub.score is not None:
        title += f", test Dice {sub.score:.4f}"
    out = Path(out) if out else ensemble_report_path(cfg)
    return _render(
        out,
        title=title,
        experiments=views,
        members=weights,
        ensemble_thresholds=tv,
        submission=sub,
        ensemble_config=config,
    )


def environment() -> dict[str, str]:
    """What produced the result: Python, torch, CUDA, device, package versions, commit."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "CUDA (torch build)": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()),
    }
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        env["device"] = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        env["device"] = f"cpu ({torch.get_num_threads()} threads)"
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    env["bonecomp"] = _commit()
    return env


# ------------------------------------------------------------------------- building views
def experiment_view(
    experiment_dir: Path,
    folds: Sequence[int] | None = None,
    n_images: int = 4,
    n_classes: int = 6,
    size: int = 480,
    thresholds: bool = True,
) -> ExperimentView:
    """Curves, CV table, heat map, worst images (and with ``thresholds`` the tuned file's
    effect on this experiment's OOF) of the trained ``folds`` (default: all) of one
    experiment folder."""
    runs = [
        RunDir(p.parent)
        for p in sorted(experiment_dir.glob("fold*/" + RunDir(experiment_dir).dice_csv.name))
        if FOLD_DIR.fullmatch(p.parent.name)
    ]
    runs = sorted((r for r in runs if folds is None or r.fold in folds), key=lambda r: r.fold)
    if not runs:
        raise RunError(
            f"{experiment_dir}: no trained fold (fold<k>/dice_per_class.csv); train first: "
            "python scripts/train.py --fold 0"
        )
    dice = pd.DataFrame(
        [pd.read_csv(r.dice_csv).set_index("class")["dice"].reindex(CLASSES) for r in runs],
        index=[r.fold for r in runs],
    )
    order = list(dice.mean(axis=0).sort_values(kind="stable").index)
    fold_views = [_fold_view(r, float(dice.loc[r.fold].mean())) for r in runs]
    table = [(k, float(dice.loc[k].mean()), dice.loc[k, order].tolist()) for k in dice.index]
    view = ExperimentView(
        name=experiment_dir.name,
        path=str(experiment_dir),
        folds=fold_views,
        classes=order,
        table=table,
        class_means=dice[order].mean(axis=0).tolist(),
        mean=float(dice.mean(axis=1).mean()),
        heatmap=Picture(_figure_uri(heatmap_figure(dice[order]))),
        configs=[(r.path.name, r.config.read_text()) for r in runs if r.config.is_file()],
    )
    if runs[0].config.is_file():
        view.angles = fold_angle_view(runs[0].saved_config())
    with_oof = [r for r in runs if has_oof(r)]
    if not with_oof:
        return view
    cfg = with_oof[0].saved_config()
    truth = GroundTruth.of(cfg.data)  # the folds share the data: one truth, read once
    images = [(r.fold, im) for r in with_oof for im in oof_images(r, truth=truth)]
    scored = [(im.dice(), fold, im) for fold, im in images]
    weak = [CLASSES.index(c) for c in order[:n_classes]]
    view.worst_classes = len(weak)
    for d, fold, im in sorted(scored, key=lambda t: t[0].mean())[:n_images]:
        worst = ", ".join(f"{CLASSES[c]} {d[c]:.3f}" for c in weak)
        caption = f"fold {fold}, {im.rel}: mean Dice {d.mean():.4f}; {worst}"
        scale = min(1.0, size / max(im.hw))
        view.worst.append(Picture(_png_uri(im.picture(weak, scale, dim=0.5)), caption))
    tpath = thresholds_in_use(cfg)
    if thresholds and _tuned_for(tpath, experiment_dir.name):
        ts, tuned_on = read_thresholds(tpath)
        before = np.mean([d for d, _, _ in scored], axis=0)
        after = np.mean([im.dice(ts) for _, _, im in scored], axis=0)
        scope = f"this experiment's OOF probabilities ({len(scored)} images)"
        view.thresholds = _threshold_view(tpath, scope, tuned_on, ts, before, after)
    return view


def _tuned_for(path: Path, experiment: str) -> bool:
    """Whether the thresholds file was tuned for this experiment alone (not an ensemble
    of several, whose thresholds would not fit one experiment's probabilities)."""
    if not path.is_file() or read_class_weights(path):
        return False
    _, tuned_on = read_thresholds(path)
    return all(Path(r).parent.name == experiment for r in tuned_on)


def _fold_view(run: RunDir, best: float) -> FoldView:
    """One fold's line: ``best`` is its mean validation Dice (dice_per_class.csv)."""
    summary = run.read_summary()  # empty when missing or empty
    epoch = None
    if "val_dice" in summary and summary["val_dice"].notna().any():
        epoch = int(summary.loc[summary["val_dice"].idxmax(), "epoch"])
    curves = None
    if len(summary):
        curves = Picture(_figure_uri(curves_figure(summary, f"fold {run.fold}")))
    cut = ""
    if "stop" in summary and summary["stop"].notna().any():
        cut = str(summary["stop"].dropna().iloc[-1])
    return FoldView(run.fold, str(run.path), best, epoch, len(summary), curves, cut)


def _threshold_view(
    path: Path,
    scope: str,
    tuned_on: list[str],
    ts: Sequence[float],
    before: np.ndarray,
    after: np.ndarray,
) -> ThresholdView:
    doc = yaml.safe_load(path.read_text())  # JSON is YAML
    order = np.argsort(before, kind="stable")
    rows = [(CLASSES[c], float(ts[c]), float(before[c]), float(after[c])) for c in order]
    recorded = (doc.get("dice_before"), doc.get("dice_after"))
    return ThresholdView(
        str(path), scope, tuned_on, rows, float(before.mean()), float(after.mean()), recorded
    )


def _submission_view(cfg: Config, csv: Path | str, labels: Path | str | None) -> SubmissionView:
    test = discover(cfg.data.root, "test")
    shapes = png_shapes(test)
    report = validate_submission(csv, test["name"].tolist(), list(shapes.values()))
    view = SubmissionView(str(csv), report.summary(), report.problems)
    view.labels = str(labels) if labels else None
    if report.ok:
        angles = submission_angles(csv, shapes)
        view.angles = AngleView(
            "predicted masks of Radius, Ulna and the third metacarpal (finger-11)",
            str(csv),
            list(BIN_NAMES),
            [angle_row("test (predicted)", angles)],
        )
        if labels:
            truth = label_index(labels)
            measured = [wrist_angle(load_annotation(truth[n])) for n in angles.index if n in truth]
            view.angles.rows.append(angle_row("test (labels)", pd.Series(measured, dtype=float)))
    if labels and report.ok:
        table, _ = score_submission(csv, labels, shapes, progress=False)
        view.score = table.mean
        order = np.argsort(table.per_class, kind="stable")
        view.per_class = [(CLASSES[c], float(table.per_class[c])) for c in order]
    return view


def angle_row(name: str, angles: pd.Series) -> tuple[str, int, list[int], float, float]:
    """One line of an ``AngleView``: measurable images, images per bin, median and largest
    |angle| (nan when none is measurable)."""
    ok = angles.dropna()
    counts = np.bincount([angle_bin(a) for a in ok], minlength=len(BIN_EDGES) + 1)
    size = ok.abs()
    median = float(size.median()) if len(ok) else float("nan")
    return name, len(ok), counts.tolist(), median, float(size.max()) if len(ok) else median


def fold_angle_view(cfg: Config) -> AngleView:
    """Wrist angles of each fold's validation images: from a stratified folds file's own
    column, else measured from the training JSONs; a missing folds file or data root is
    a note, not an error (a report may be written away from the data)."""
    d = cfg.data
    path = folds_path(data_cache_dir(d.cache_dir, d.root), d.n_splits, d.fold_seed, d.fold_stratify)
    rule = (
        f"StratifiedGroupKFold by patient on data.fold_stratify={d.fold_stratify}"
        if d.fold_stratify
        else "GroupKFold by patient (data.fold_stratify=null)"
    )
    view = AngleView(rule, str(path), list(BIN_NAMES), [])
    if not path.is_file():
        view.note = "folds file not found: angles per fold not shown"
        return view
    folds = pd.read_csv(path, dtype={"image": str})
    if "wrist_angle" not in folds:
        try:
            measured = table_angles(discover(d.root))
        except (OSError, ValueError) as e:
            view.note = f"training annotations not readable here ({e})"
            return view
        folds["wrist_angle"] = measured.reindex(folds["image"]).to_numpy()
    for k, part in folds.groupby("fold"):
        view.rows.append(angle_row(f"fold {k}", part["wrist_angle"]))
    view.rows.append(angle_row("all training", folds["wrist_angle"]))
    return view


def submission_angles(csv: Path | str, shapes: dict[str, tuple[int, int]]) -> pd.Series:
    """Wrist angle of each image of a (valid) submission, from its predicted masks of the
    angle's bones; nan where one of them is empty. Indexed by image name."""
    df = read_submission(csv)
    names = list(dict.fromkeys(df["image_name"]))
    codes = df["rle"].to_numpy().reshape(len(names), NUM_CLASSES)
    return pd.Series(
        [
            wrist_angle_of_masks({c: rle.decode(codes[k, c], shapes[n]) for c in ANGLE_CLASSES})
            for k, n in enumerate(names)
        ],
        index=names,
        dtype=float,
    )


# ------------------------------------------------------------------------------- figures
def curves_figure(summary: pd.DataFrame, title: str = "") -> Figure:
    """Losses (every ``loss*`` column and ``val_loss``), the validation metrics (every other
    ``val_*`` column, ``val_dice`` with its best value) and learning rate per epoch, side by
    side."""
    fig = Figure(figsize=(12, 2.8))
    axes = fig.subplots(1, 3)
    x = summary["epoch"]
    losses = [c for c in summary.columns if c.startswith("loss") or c == "val_loss"]
    for c in losses:
        ax = axes[0]
        ax.plot(x, summary[c], marker=".", label=c, linestyle="--" if c == "val_loss" else "-")
    axes[0].set_title(f"{title} losses".strip())
    if losses:
        axes[0].legend(fontsize=7)
    scores = [c for c in summary.columns if c.startswith("val_") and c != "val_loss"]
    for c in scores:  # a registered metric is one more line here
        v = summary.dropna(subset=[c])
        axes[1].plot(v["epoch"], v[c], marker="o", label=c,
                     color="tab:green" if c == "val_dice" else None)  # fmt: skip
    if "val_dice" in summary:
        v = summary.dropna(subset=["val_dice"])
        xv = v["epoch"]
        if len(v):
            best = v["val_dice"].idxmax()
            axes[1].annotate(
                f"{v.loc[best, 'val_dice']:.4f}",
                (xv[best], v.loc[best, "val_dice"]),
                textcoords="offset points",
                xytext=(0, -12),
                ha="center",
                fontsize=8,
            )
    if len(scores) > 1:
        axes[1].legend(fontsize=7)
    axes[1].set_title("validation (2048 px)")
    if "lr" in summary:
        axes[2].plot(x, summary["lr"], color="tab:purple")
        if (summary["lr"] > 0).all():
            axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap_figure(dice: pd.DataFrame) -> Figure:
    """Folds x classes Dice (columns in the given order) with the values written in."""
    fig = Figure(figsize=(13, 1.4 + 0.4 * len(dice)))
    ax = fig.add_subplot()
    values = dice.to_numpy(float)
    lo = max(0.0, float(np.nanmin(values)) - 0.02)
    im = ax.imshow(values, aspect="auto", cmap="RdYlGn", vmin=lo, vmax=1)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(dice.columns)), list(dice.columns), rotation=70, fontsize=7)
    ax.set_yticks(range(len(dice)), [f"fold {k}" for k in dice.index], fontsize=8)
    ax.set_title("Dice per fold and class (weakest classes on the left)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    return fig


def _figure_uri(fig: Figure, dpi: int = 80) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(picture: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", picture)
    if not ok:
        raise ValueError("could not encode a picture as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


# ------------------------------------------------------------------------------ rendering
def _render(out: Path, **context) -> Path:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bonecomp", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    context.setdefault("members", [])
    for key in ("ensemble_thresholds", "submission", "ensemble_config"):
        context.setdefault(key, None)
    html = env.get_template(TEMPLATE).render(
        generated=dt.datetime.now().isoformat(timespec="seconds"),
        environment=environment(),
        **context,
    )
    return write_text(out, html)


def _commit() -> str:
    """The checkout's git commit (``+dirty`` with local changes), or the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        return f"git {head}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        try:
            return importlib.metadata.version("bonecomp")
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
