"""Experiment trackers (``train.trackers``): TensorBoard, Weights & Biases, MLflow.

One small interface (``Tracker``), one class per library, and the registry ``TRACKERS``
(``register_tracker`` adds a class of the user's own, from a module under ``extensions``:
docs/extending.md). ``training.records.SummaryLog`` is the only caller: each ``summary.csv``
row reaches every tracker from the place that writes the row, so the trackers and the
file cannot drift. Every tracker gets the resolved config, each epoch's summary columns
(numbers as metrics, text such as the ``stop`` note as text), the best epoch's per-class
Dice, and the experiment's report as an artifact where the library keeps files.

A library is imported only when its tracker starts; ``check_trackers`` (from
``checks.check_config``) finds a missing one in milliseconds, before any work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import yaml

from bonecomp.config import ConfigError
from bonecomp.models.encoder_weights import reachable
from bonecomp.registry import Registry
from bonecomp.runs import MLFLOW_ARTIFACTS, MLFLOW_DB, RunDir

INSTALL = 'pip install -e ".[track]"'
PROJECT = "bonecomp"  # the W&B project and the MLflow experiment of every run
FINAL = "final_dice/"  # prefix of the per-class Dice keys (e.g. final_dice/Lunate)

Values = dict[str, float | str]


class Tracker:
    """What every tracker does; the class attributes say what it needs installed."""

    modules: ClassVar[tuple[str, ...]] = ()  # import names that must be installed
    packages: ClassVar[str] = ""  # their pip names, for the message
    hint: ClassVar[str] = ""  # what to do when the library refuses to start a run

    @classmethod
    def missing(cls) -> list[str]:
        """The required modules that are not installed."""
        return [m for m in cls.modules if not _installed(m)]

    @classmethod
    def unreachable(cls) -> str | None:
        """Why the tracker's server cannot be reached, found in seconds (None: it can, or
        there is no server): checked before any work, where the library itself would
        retry for minutes after the run folder was claimed."""
        return None

    def start(self, config: dict[str, Any], run: RunDir) -> None:
        """Open the tracker's run for fold folder ``run`` and record the resolved config."""
        raise NotImplementedError

    def log(self, values: Values, step: int) -> None:
        """One epoch's summary columns (``step`` is the epoch)."""
        raise NotImplementedError

    def log_final(self, dice: dict[str, float]) -> None:
        """The best epoch's Dice per class name."""
        raise NotImplementedError

    def artifact(self, path: Path) -> None:
        """Keep a file (the report) with the run; a tracker without files notes the path."""
        raise NotImplementedError

    def finish(self, ok: bool = True) -> None:
        """Close the run; ``ok=False`` when training failed."""
        raise NotImplementedError


def _installed(module: str) -> bool:
    if module in sys.modules:  # an import that failed (or a test's stand-in) is None
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _run_name(run: RunDir) -> str:
    return f"{run.experiment}/{run.path.name}"


class TensorBoard(Tracker):
    """Event files in ``<fold>/tb/``; the config and the report's path as text."""

    modules = ("tensorboard",)
    packages = "tensorboard"

    def start(self, config: dict[str, Any], run: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard))
        self.step = 0
        self.writer.add_text("config", _markdown_code(yaml.safe_dump(config, sort_keys=False)))

    def log(self, values: Values, step: int) -> None:
        self.step = step
        for k, v in values.items():
            if isinstance(v, str):
                self.writer.add_text(k, v, step)
            else:
                self.writer.add_scalar(k, v, step)

    def log_final(self, dice: dict[str, float]) -> None:
        for name, v in dice.items():
            self.writer.add_scalar(FINAL + name, v, self.step)

    def artifact(self, path: Path) -> None:  # TensorBoard keeps no files: say where it is
        self.writer.add_text(path.stem, str(path.resolve()), self.step)

    def finish(self, ok: bool = True) -> None:
        self.writer.close()


def _markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indent to keep the YAML as it is."""
    return "".join(f"    {line}\n" for line in text.splitlines())


class WandB(Tracker):
    """A W&B run in project ``bonecomp``; files under ``<fold>/wandb/`` unless
    ``WANDB_DIR`` is set. ``WANDB_MODE=offline`` logs without an account (``wandb sync``
    uploads later); every other ``WANDB_*`` variable works as W&B documents."""

    modules = ("wandb",)
    packages = "wandb"
    hint = "log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline"

    def start(self, config: dict[str, Any], run: RunDir) -> None:
        import wandb

        self.wandb = wandb
        self.name = _run_name(run)
        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(run.path)}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT), name=self.name,
            group=run.experiment, config=config, reinit="create_new", **kwargs,
        )  # fmt: skip

    def log(self, values: Values, step: int) -> None:
        self.run.log(values, step=step)

    def log_final(self, dice: dict[str, float]) -> None:
        self.run.summary.update({FINAL + k: v for k, v in dice.items()})

    def artifact(self, path: Path) -> None:
        # artifact names allow letters, digits, '-', '_' and '.'
        name = re.sub(r"[^\w.-]", "-", f"{self.name}-{path.stem}")
        art = self.wandb.Artifact(name, type=path.stem)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MLflow(Tracker):
    """An MLflow run in experiment ``bonecomp`` (or ``MLFLOW_EXPERIMENT_NAME``).

    Store: ``MLFLOW_TRACKING_URI`` when set (a team's server, a database); else SQLite in
    ``<train.output_dir>/mlflow.db`` with artifacts beside it, one store for every
    experiment and fold so they can be compared (``mlflow ui --backend-store-uri
    sqlite:///runs/mlflow.db``). SQLite and not a folder: MLflow 3 refuses its file store
    unless told to, and mlflow-skinny needs only sqlalchemy and alembic for SQLite.
    """

    modules = ("mlflow",)
    packages = "mlflow-skinny sqlalchemy alembic"
    hint = "check MLFLOW_TRACKING_URI (unset: SQLite in train.output_dir)"

    @classmethod
    def missing(cls) -> list[str]:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        remote = uri.startswith(("http:", "https:", "databricks", "file:"))
        need = cls.modules if remote else (*cls.modules, "sqlalchemy", "alembic")
        return [m for m in need if not _installed(m)]

    @classmethod
    def unreachable(cls, timeout: float = 3.0) -> str | None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        url = urlparse(uri)
        if url.scheme not in ("http", "https") or not url.hostname:
            return None  # a local store or a database: nothing to reach
        port = url.port or (443 if url.scheme == "https" else 80)
        if reachable(url.hostname, port, timeout):
            return None
        return (
            f"MLFLOW_TRACKING_URI={uri}: no server answers at {url.hostname}:{port} within "
            f"{timeout:g} s; start it, fix the variable, or unset it (a local SQLite store in "
            "train.output_dir)"
        )

    def start(self, config: dict[str, Any], run: RunDir) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.Metric = Metric
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        store = run.root.resolve()
        uri = f"sqlite:///{store / MLFLOW_DB}" if local else None
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                where = (store / MLFLOW_ARTIFACTS).as_uri() if local else None
                experiment_id = self.client.create_experiment(name, artifact_location=where)
            except MlflowException:  # another fold created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = {"experiment": run.experiment, "fold": run.path.name.removeprefix("fold")}
        self.run_id = self.client.create_run(
            experiment_id, run_name=_run_name(run), tags=tags
        ).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_dict(self.run_id, config, "config.yaml")
        self.step = 0

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log(self, values: Values, step: int) -> None:
        self.step = step
        self._metrics({k: v for k, v in values.items() if not isinstance(v, str)}, step)
        for k, v in values.items():
            if isinstance(v, str):
                self.client.set_tag(self.run_id, k, v)

    def log_final(self, dice: dict[str, float]) -> None:
        self._metrics({FINAL + k: v for k, v in dice.items()}, self.step)

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


TRACKERS: Registry[type[Tracker]] = Registry("tracker", "train.trackers")


def register_tracker(name: str, cls: type[Tracker] | None = None, *, replace: bool = False):
    """Add the tracker ``name`` (``train.trackers: [name]``): ``register_tracker(name, cls)``,
    or ``@register_tracker(name)`` over a subclass of ``Tracker``. Returns the class.

    Each fold makes one instance (no arguments) and calls ``start``, then ``log`` with every
    ``summary.csv`` row, ``log_final``, ``artifact`` and ``finish``. A name already
    registered is refused (``ValueError``) unless ``replace=True``.
    """
    return TRACKERS.register(name, cls, replace=replace)


register_tracker("tensorboard", TensorBoard)
register_tracker("wandb", WandB)
register_tracker("mlflow", MLflow)


def check_trackers(names: list[str]) -> None:
    """``ConfigError`` naming ``train.trackers[i]`` for an unknown or repeated name, a
    tracker whose package is not installed (with the command that installs it), or whose
    server does not answer (seconds, before any work). Names are checked before packages:
    a wrong list is the same error on every machine."""
    for i, name in enumerate(names):
        key = f"train.trackers[{i}]"
        TRACKERS.get(name, key)  # an unknown one: the registry's one line
        if name in names[:i]:
            raise ConfigError(f"{key}: lists {name!r} twice", key)
    for i, name in enumerate(names):
        key = f"train.trackers[{i}]"
        missing = TRACKERS.get(name).missing()
        if missing:
            raise ConfigError(
                f"{key}: {name} needs {', '.join(missing)}, which is not installed: "
                f"{INSTALL} (or pip install {TRACKERS.get(name).packages})",
                key,
            )
        why = TRACKERS.get(name).unreachable()
        if why:
            raise ConfigError(f"{key}: {name}: {why}", key)


class Trackers:
    """The started trackers of one fold, called together (none: every call is free)."""

    def __init__(self, names: list[str], config: dict[str, Any], run: RunDir) -> None:
        self.started: list[Tracker] = []
        for i, name in enumerate(names):
            tracker = TRACKERS.get(name)()
            try:
                tracker.start(config, run)
            except BaseException as e:
                with contextlib.suppress(Exception):  # the reason to report is ``e``
                    self.finish(ok=False)
                if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
                    raise
                # the library's own reason (no login, no server) in one line, and the way out
                key, why = f"train.trackers[{i}]", " ".join(str(e).split())[:300]
                hint = f"; {tracker.hint}" if tracker.hint else ""
                raise ConfigError(
                    f"{key}: {name} did not start ({type(e).__name__}: {why}){hint}", key
                ) from e
            self.started.append(tracker)

    def log(self, values: Values, step: int) -> None:
        for t in self.started:
            t.log(values, step)

    def log_final(self, dice: dict[str, float]) -> None:
        for t in self.started:
            t.log_final(dice)

    def artifact(self, path: Path) -> None:
        for t in self.started:
            t.artifact(path)

    def finish(self, ok: bool = True) -> None:
        """Close every run, even when one of them fails to close."""
        errors = []
        for t in self.started:
            try:
                t.finish(ok)
            except Exception as e:  # the others still close; the first error is raised
                errors.append(e)
        self.started = []
        if errors:
            raise errors[0]
