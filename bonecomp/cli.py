"""What every script shares: the ``--config`` / overrides arguments, the default recipe,
and one-line errors for users' mistakes (a traceback only for our bugs).

Scripts stay thin: parse arguments here, call one library function, print its result.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bonecomp.checkpoint import CheckpointError
from bonecomp.checks import check_config
from bonecomp.config import Config, ConfigError, load_config
from bonecomp.data.annotations import AnnotationError
from bonecomp.data.cache import CacheError
from bonecomp.data.folds import FoldsError
from bonecomp.data.images import ImageReadError
from bonecomp.data.layout import DataLayoutError
from bonecomp.data.pseudo_dir import PseudoError
from bonecomp.distributed import RankError
from bonecomp.engine import NonFiniteLossError
from bonecomp.fileio import OutputError
from bonecomp.memory import BatchMemoryError
from bonecomp.models.encoder_weights import WeightsError
from bonecomp.runs import MemberSpec, RunError, ensemble_members
from bonecomp.submission import SubmissionError

# The competition recipe (configs/default.yaml names it); the demo passes its own config.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

# Mistakes in the user's data, config or files: one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataLayoutError, RunError, CheckpointError, FoldsError, AnnotationError,
    ImageReadError, WeightsError, NonFiniteLossError, CacheError, BatchMemoryError,
    OutputError, PseudoError, RankError,
)  # fmt: skip


def parser(doc: str | None, config: bool = True) -> argparse.ArgumentParser:
    """An argument parser with ``--quiet`` and, with ``config``, ``--config`` and
    dotted overrides (``train.epochs=50``) anywhere on the line."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    if config:
        ap.add_argument(
            "--config", default=str(DEFAULT_CONFIG), help="recipe YAML (default: %(default)s)"
        )
        ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=50")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument(
        "--debug", action="store_true",
        help="debug lines on stdout (under torchrun: each rank's items and final weights hash)",
    )  # fmt: skip
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after flags
    if getattr(args, "debug", False):
        log = logging.getLogger("bonecomp")
        if not any(h.get_name() == "bonecomp-debug" for h in log.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.set_name("bonecomp-debug")
            handler.setFormatter(logging.Formatter("debug: %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    return args


def load(args: argparse.Namespace, training: bool = False) -> Config:
    """The recipe of ``--config`` with the command line's overrides applied, checked whole
    (names, ranges, model and input size; with ``training``, what only training needs)
    before any expensive work."""
    cfg = load_config(args.config, args.overrides)
    check_config(cfg, training)
    return cfg


def add_members(ap: argparse.ArgumentParser) -> None:
    """``--checkpoints``: the members of a script that works on an ensemble's output."""
    ap.add_argument("--checkpoints", nargs="+", default=(), help="members (default: the ensemble)")


def members(args: argparse.Namespace, cfg: Config) -> list[MemberSpec]:
    """``--checkpoints`` when given, else the recipe's ensemble (``infer.ensemble``)."""
    return ensemble_members(cfg, ensemble=True, explicit=args.checkpoints)


def folds(value: str, cfg: Config) -> list[int]:
    """``--fold``: an index in range, or ``all``."""
    n = cfg.data.n_splits
    if value == "all":
        return list(range(n))
    if not value.isdigit() or int(value) >= n:
        raise ConfigError(f"--fold {value!r}: expected 0..{n - 1} (data.n_splits={n}) or 'all'")
    return [int(value)]


def check_out_file(path: str | None, option: str = "--out") -> None:
    """An output file option names a file that can be written: not a folder, and not
    below a file (``ConfigError`` naming the option, before any work)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option}: {target} is a folder; name a file in it, e.g. "
                          f"{target / 'thresholds.json'}")  # fmt: skip
    for part in target.parents:
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{option}: {target} is below the file {part}, not a folder")
            break


def check_grid(
    values: Sequence[float], option: str = "--grid", closed: bool = False,
    must_hold: float | None = None,
) -> None:  # fmt: skip
    """Candidate values of a tuning grid: finite, in (0, 1) (thresholds) or with
    ``closed`` in [0, 1] (crop weights), holding ``must_hold`` (the default kept unless
    beaten, so tuning never lowers the OOF Dice)."""
    span = "[0, 1]" if closed else "(0, 1)"
    for v in values:
        inside = 0 <= v <= 1 if closed else 0 < v < 1  # False for nan
        if not inside:
            raise ConfigError(f"{option}: {v} is not in {span}")
    if must_hold is not None and must_hold not in values:
        raise ConfigError(
            f"{option} must hold {must_hold} (the value kept unless another beats it), got "
            f"{list(values)}"
        )


def check_min_gain(value: float, option: str = "--min-gain") -> None:
    """A tuning script's ``--min-gain``: a finite number >= 0 (a negative one would keep
    choices that lower the OOF Dice)."""
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(
            f"{option}: {value} must be a number >= 0 (a choice is kept only when it gains "
            "more than this on OOF)"
        )


def one_line(error: BaseException) -> str:
    """The error's message; one re-raised from a DataLoader worker carries the worker's
    traceback, of which only the last line is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def run(body: Callable[[], int]) -> int:
    """Run a script's body; a user's mistake ends in one line on stderr, not a traceback.

    Exit codes: 0 done, 1 an invalid submission, 2 a problem in the input, 130 interrupted.
    """
    try:
        return body()
    except SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
