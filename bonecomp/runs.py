"""The run folder contract: every file name under ``runs/`` and how an ensemble section
resolves into checkpoints. Training, tuning, inference, pictures and scripts ask this
module; no other file spells these names.

    <train.output_dir>/<experiment>/fold<k>/
        config.yaml          the resolved config
        summary.csv          one row per epoch: loss parts, val Dice, lr, img/s, time
        dice_per_class.csv   per-class Dice of the best epoch (and .png, its chart)
        best.pt, last.pt     self-describing checkpoints (last.pt also resumes)
        averaged.pt          train.average: the mean of the chosen epochs' weights (BatchNorm
                             statistics recomputed), self-describing like best.pt, and
        dice_per_class_averaged.csv   its per-class validation Dice
        average_pool/epoch<e>.pt      train.average: the weights of the epochs it averages
                             (at most k per key; kept for a resume)
        oof.npy, oof_index.csv   out-of-fold probabilities of the best model (float16),
                             the index recording the epoch (best.pt's)
        batch_plan.json      train.micro_batch=auto: the probed micro-batch and peaks
        tb/, wandb/          train.trackers: TensorBoard events, W&B run files
        .lock                held while a process trains this fold (removed after)
    <train.output_dir>/<experiment>/report.html      the experiment's report (all folds)
    <train.output_dir>/mlflow.db, mlartifacts/   train.trackers: mlflow's default local
        store (every experiment and fold in one, to compare them) and its artifacts
    <train.output_dir>/thresholds_<infer.name>.json   per-class thresholds of an ensemble
        (and, from scripts/tune_ensemble.py, its class_weights table: {experiment: [29]})
    <train.output_dir>/report_<infer.name>.html       the report of an ensemble
    <train.output_dir>/pseudo_<infer.name>/           pseudo-labels of the ensemble's test
        images (scripts/pseudo_label.py; any folder with --out), read by train.pseudo_labels:
        images.npy   (N, S, S) uint8 test images at data.image_size (INTER_AREA, as the cache)
        probs.npy    (N, C, S, S) uint8 ensemble probabilities x 255
        crc.npy      (N, 2) uint32 crc32 of each image row and probability row
        index.csv    rel, patient, name, src_h, src_w
        meta.json    version, size, members, thresholds, TTA; bytes (+ hash) of each file

``infer.crop`` names a crop experiment's folds the same way (``crop_members``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from bonecomp.config import Config, check_values, config_from_saved
from bonecomp.fileio import output_errors, pid_alive

CONFIG = "config.yaml"
SUMMARY = "summary.csv"
DICE_CSV = "dice_per_class.csv"
DICE_PNG = "dice_per_class.png"
BEST = "best.pt"
LAST = "last.pt"
AVERAGED = "averaged.pt"
AVERAGED_DICE_CSV = "dice_per_class_averaged.csv"
AVERAGE_POOL = "average_pool"
OOF = "oof.npy"
OOF_INDEX = "oof_index.csv"
OOF_EPOCH = "epoch"  # oof_index.csv's column: the epoch whose validation made the maps
LOCK = ".lock"
BATCH_PLAN = "batch_plan.json"
TENSORBOARD = "tb"  # train.trackers: the fold's TensorBoard event files
MLFLOW_DB = "mlflow.db"  # train.trackers: MLflow's default store, in train.output_dir
MLFLOW_ARTIFACTS = "mlartifacts"  # beside it: the artifacts of that store's runs
REPORT = "report.html"  # per experiment (runs/<experiment>/) and per ensemble (runs/)
# the names an ensemble section (and infer.crop) may use
CHECKPOINTS = {"best": BEST, "last": LAST, "averaged": AVERAGED}
PSEUDO_IMAGES = "images.npy"
PSEUDO_PROBS = "probs.npy"
PSEUDO_CRC = "crc.npy"
PSEUDO_INDEX = "index.csv"
PSEUDO_META = "meta.json"  # written last: a folder without it is not a pseudo-label folder


_REWRITE = "delete it: --resume writes it again from the next epoch (the rows before are lost)"


class RunError(RuntimeError):
    """A run folder that cannot be used as asked; the message names it and what to do."""


@dataclass(frozen=True)
class RunDir:
    """One fold's run folder and the paths of its files."""

    path: Path

    @property
    def experiment(self) -> str:
        return self.path.parent.name

    @property
    def fold(self) -> int:
        return int(self.path.name.removeprefix("fold"))

    config = property(lambda self: self.path / CONFIG)
    summary = property(lambda self: self.path / SUMMARY)
    dice_csv = property(lambda self: self.path / DICE_CSV)
    dice_png = property(lambda self: self.path / DICE_PNG)
    best = property(lambda self: self.path / BEST)
    last = property(lambda self: self.path / LAST)
    averaged = property(lambda self: self.path / AVERAGED)
    averaged_dice_csv = property(lambda self: self.path / AVERAGED_DICE_CSV)
    average_pool = property(lambda self: self.path / AVERAGE_POOL)
    oof = property(lambda self: self.path / OOF)
    oof_index = property(lambda self: self.path / OOF_INDEX)
    batch_plan = property(lambda self: self.path / BATCH_PLAN)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    root = property(lambda self: self.path.parent.parent)  # train.output_dir

    def saved_config(self) -> Config:
        """The run's ``config.yaml`` as a ``Config`` (errors name the file)."""
        return config_from_saved(yaml.safe_load(self.config.read_text()), str(self.config))

    def read_summary(self) -> pd.DataFrame:
        """``summary.csv`` as a table: empty when the file is missing or empty (nothing
        logged yet, or a disk that lost its bytes); a file that does not parse, or has no
        ``epoch`` column, is a ``RunError`` naming it (a resume writes it again)."""
        try:
            table = pd.read_csv(self.summary)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return pd.DataFrame()
        except (OSError, ValueError) as e:  # ParserError, UnicodeDecodeError are ValueErrors
            raise RunError(f"{self.summary}: cannot be read ({e}); {_REWRITE}") from e
        if len(table.columns) and "epoch" not in table:
            raise RunError(f"{self.summary}: no 'epoch' column; {_REWRITE}")
        return table

    def pooled(self, epoch: int) -> Path:
        """Where ``train.average`` keeps the weights of ``epoch``."""
        return self.average_pool / f"epoch{epoch:04d}.pt"

    def pool_files(self) -> list[Path]:
        """The weights kept in ``average_pool`` (none when it is not there)."""
        return sorted(self.average_pool.glob("epoch*.pt"))

    def staged(self, name: str) -> Path:
        """Where a file is prepared before it replaces ``name`` (e.g. OOF of a new best)."""
        return self.path / f".{name}.staged"

    def __str__(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this fold's lock; a second process training it is refused at once.

        The file is removed on release (a finished or failed run leaves no ``.lock``);
        a process that took the lock on a file just removed by its releasing holder
        retries on the new one, so two processes never both hold it. Folders the lock
        created are removed on release when still empty (a run refused before it wrote a
        file leaves no empty ``fold<k>/``)."""
        path = self.path / LOCK
        made = [p for p in (self.path, *self.path.parents) if not p.exists()]  # inner first
        with output_errors(path):
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            with self._flocked(path):
                yield
        finally:  # a run refused before it wrote anything leaves no empty folder
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty

    @contextlib.contextmanager
    def _flocked(self, path: Path) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        while True:
            with output_errors(path):
                f = open(path, "a+")  # noqa: SIM115 - closed by the with below
            with f:
                if not _flock(f, fcntl):
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise RunError(
                        f"{self.path} is being trained by {holder}; wait for it to finish or "
                        "stop it, or choose another train.experiment"
                    ) from None
                if not _same_file(f, path):
                    continue  # its holder removed it while we waited: lock the new one
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()}")
                f.flush()
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)  # while held: no one locks a stale file
                    fcntl.flock(f, fcntl.LOCK_UN)
                return


def _same_file(f, path: Path) -> bool:
    """Whether the open file ``f`` is still the one at ``path``."""
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _flock(f, fcntl, grace_s: float = 15.0) -> bool:
    """Take the lock; False when a live process holds it. A process killed with SIGKILL
    leaves its forked DataLoader workers holding it until their parent watchdog stops
    them (a few seconds): when the recorded pid is dead, wait for them up to ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip().removeprefix("pid ")
            if not pid.isdigit() or pid_alive(int(pid)) or time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def oof_epoch(index: Path) -> int | None:
    """The epoch an ``oof_index.csv`` (committed or staged) records for its maps; None
    when the file is missing, unreadable, or from before the epoch was recorded."""
    try:
        column = pd.read_csv(index, usecols=[OOF_EPOCH], nrows=1)[OOF_EPOCH]
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return None
    return int(column.iloc[0]) if len(column) else None


def run_name(path: Path | str) -> str:
    """``<experiment>/fold<k>``: what a run folder is, wherever ``train.output_dir`` lies
    (a thresholds file names the runs it was tuned on; a moved runs folder is the same)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def crop_stage_error(run: RunDir | Path | str) -> RunError:
    """The one refusal of a carpal-crop run (``data.crop``) where whole-image members go
    (``infer.ensemble``, ``--checkpoints``): threshold and ensemble tuning find it by its
    OOF maps' boxes, inference by its checkpoint's config; both say this."""
    return RunError(
        f"{run} is a crop experiment (data.crop): it was trained on the carpal box, not the "
        "whole image; use it as infer.crop (scripts/crop_oof.py), not as an ensemble member"
    )


def runs_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir)


def run_dir(cfg: Config, fold: int, experiment: str | None = None) -> RunDir:
    """The folder of ``fold`` of ``experiment`` (default: the config's own)."""
    return RunDir(runs_root(cfg) / (experiment or cfg.train.experiment) / f"fold{fold}")


def thresholds_path(cfg: Config) -> Path:
    """Per-class thresholds of the config's ensemble: ``runs/thresholds_<infer.name>.json``."""
    return runs_root(cfg) / f"thresholds_{cfg.infer.name}.json"


def thresholds_in_use(cfg: Config) -> Path:
    """The thresholds file inference reads: ``infer.thresholds``, else ``thresholds_path``
    (it may not exist: then ``infer.threshold`` applies)."""
    return Path(cfg.infer.thresholds) if cfg.infer.thresholds else thresholds_path(cfg)


def experiment_dir(cfg: Config, experiment: str | None = None) -> Path:
    """``runs/<experiment>/``: the folds of one experiment and its report."""
    return runs_root(cfg) / (experiment or cfg.train.experiment)


def report_path(experiment: Path | str) -> Path:
    """The report of an experiment folder: ``runs/<experiment>/report.html``."""
    return Path(experiment) / REPORT


def ensemble_report_path(cfg: Config) -> Path:
    """The report of the config's ensemble: ``runs/report_<infer.name>.html``."""
    return runs_root(cfg) / f"report_{cfg.infer.name}.html"


def pseudo_path(cfg: Config) -> Path:
    """Default pseudo-label folder of the config's ensemble: ``runs/pseudo_<infer.name>/``."""
    return runs_root(cfg) / f"pseudo_{cfg.infer.name}"


@dataclass(frozen=True)
class PseudoDir:
    """A pseudo-label folder and the paths of its files."""

    path: Path

    images = property(lambda self: self.path / PSEUDO_IMAGES)
    probs = property(lambda self: self.path / PSEUDO_PROBS)
    crc = property(lambda self: self.path / PSEUDO_CRC)
    index = property(lambda self: self.path / PSEUDO_INDEX)
    meta = property(lambda self: self.path / PSEUDO_META)

    def __str__(self) -> str:
        return str(self.path)


def checkpoint_file(name: str) -> str:
    """``infer.ensemble[].checkpoint``: ``best``, ``last``, ``averaged`` or a file name in
    the fold folder."""
    return CHECKPOINTS.get(name, name)


@dataclass(frozen=True)
class MemberSpec:
    """One checkpoint of an ensemble and its weight."""

    checkpoint: Path
    weight: float = 1.0

    @property
    def run(self) -> RunDir:
        return RunDir(self.checkpoint.parent)


def ensemble_members(
    cfg: Config, ensemble: bool = True, explicit: Sequence[str | Path] = ()
) -> list[MemberSpec]:
    """The checkpoints a command uses, the same for threshold tuning and inference.

    ``explicit`` paths win (weight 1 each). Else, with ``ensemble``, the ``infer.ensemble``
    section (experiments x folds x checkpoint name, with weights); an empty section means
    every fold of the config's own experiment that has a ``best.pt``. Without
    ``ensemble``: the first trained fold of the config's own experiment. A missing file is
    an error, and so is a section that breaks ``config.check_values`` (an experiment listed
    twice would be silently weighted twice).
    """
    root = runs_root(cfg)
    if explicit:
        found = [MemberSpec(Path(p)) for p in explicit]
    elif ensemble and cfg.infer.ensemble:
        check_values(cfg)  # the section's rules, also for a config changed after loading
        found = [
            MemberSpec(run_dir(cfg, k, m.experiment).path / checkpoint_file(m.checkpoint), m.weight)
            for m in cfg.infer.ensemble
            for k in m.folds
        ]
    else:
        own = sorted((root / cfg.train.experiment).glob(f"fold*/{BEST}"))
        if not ensemble:
            own = own[:1]
        found = [MemberSpec(p) for p in own] or [MemberSpec(run_dir(cfg, fold=0).best)]
    _check_exist(found, root)
    return found


def crop_members(cfg: Config) -> list[MemberSpec]:
    """The checkpoints of ``infer.crop`` (folds of a crop experiment), or [] when there is
    no crop stage. Missing files: a ``RunError`` naming the key and the files."""
    spec = cfg.infer.crop
    if spec.experiment is None:
        return []
    found = [
        MemberSpec(run_dir(cfg, k, spec.experiment).path / checkpoint_file(spec.checkpoint))
        for k in spec.folds
    ]
    missing = [str(m.checkpoint) for m in found if not m.checkpoint.is_file()]
    if missing:
        raise RunError(
            f"infer.crop.experiment {spec.experiment!r}: no trained fold at {', '.join(missing)}; "
            f"train it (python scripts/train.py --config <crop recipe> --fold all) or "
            "set infer.crop.folds / infer.crop.experiment=null"
        )
    return found


def _check_exist(found: list[MemberSpec], root: Path) -> None:
    missing = [str(m.checkpoint) for m in found if not m.checkpoint.is_file()]
    if missing:
        have = sorted(str(p) for p in root.glob("*/fold*/*.pt"))
        raise RunError(
            f"checkpoint(s) not found: {', '.join(missing)}; available under {root}: "
            f"{', '.join(have) or 'none (train first: python scripts/train.py --fold 0)'}"
        )
