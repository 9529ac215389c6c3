"""Self-describing checkpoints, written atomically and loaded with ``weights_only=True``.

A checkpoint carries everything inference needs: weights, the resolved config, class
names, fold, input size, epoch and metric. (Tuned thresholds live in their own JSON file,
see ``inference.thresholds``.)
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonecomp.classes import CLASSES
from bonecomp.config import Config, ConfigError, config_from_saved, to_dict
from bonecomp.fileio import atomic_write, reserve

FORMAT = "bonecomp-checkpoint-1"


class CheckpointError(ValueError):
    """A file that is not a usable bonecomp checkpoint; the message names it.

    ``reason`` is what is wrong without the way out, for a caller that knows a better one
    (a damaged ``best.pt`` on ``--resume`` is deleted, not saved again)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


AGAIN = "copy or save it again"  # the way out of a damaged file, unless the caller knows one


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """``torch.save`` through ``atomic_write``: a crash never leaves a torn file.

    The file's blocks are reserved first (the tensors' bytes and room for the archive's
    records), so a disk that cannot take it is ``OutputError`` naming the file before a
    byte is written; should torch's writer still fail on the disk, the operating
    system's error is reported the same way, never torch's ``enforce fail`` traceback."""
    obj = {"format": FORMAT, **payload}
    with atomic_write(path, "wb") as f:
        reserve(f.fileno(), _archive_bytes(obj))
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer hides the OSError of a full disk
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.truncate()  # down from the reserved room to what was written


def _archive_bytes(obj: Any) -> int:
    """An upper bound of what ``torch.save`` writes for ``obj``: every tensor's bytes, 4 KiB
    per tensor for its zip record and alignment, and 1 MiB for the pickled rest."""
    tensors = _tensors(obj)
    return sum(t.untyped_storage().nbytes() for t in tensors) + 4096 * len(tensors) + (1 << 20)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint (tensors and plain Python only: ``weights_only=True``).

    Any file that is not a usable bonecomp checkpoint raises ``CheckpointError``: one
    line naming the file and what is wrong with it (torch's own multi-paragraph text,
    which suggests ``weights_only=False``, never reaches the user).
    """
    path = Path(path)
    ckpt = read_torch_file(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = "a plain state_dict" if _is_state_dict(ckpt) else f"a {type(ckpt).__name__}"
        raise CheckpointError(
            f"{path}: not a bonecomp checkpoint ({what} without its config); use a best.pt or "
            "last.pt written by scripts/train.py"
        )
    missing = [k for k in ("config", "model", "input_size") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: bonecomp checkpoint without {', '.join(missing)}")
    classes = list(ckpt.get("classes", []))
    if classes != list(CLASSES):
        raise CheckpointError(
            f"{path}: its class list ({len(classes)} classes, starting {classes[:2]}) differs "
            f"from this version's {len(CLASSES)} classes ({CLASSES[0]!r}, ...)"
        )
    return ckpt


def read_torch_file(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """What ``torch.save`` wrote to ``path``, loaded with ``weights_only=True`` (tensors and
    plain data: a pickle of other objects could run code). A folder, a missing, empty,
    truncated or foreign file, or an unsafe pickle is a ``CheckpointError`` naming the
    file in one line (never torch's ``weights_only=False`` advice). The one reader of
    torch files: checkpoints and ``model.encoder_weights`` files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; name the file (e.g. {path / 'best.pt'})"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = _container_problem(path)
    if problem:
        reason, again = problem
        raise CheckpointError(f"{path}: {reason}" + (f"; {AGAIN}" if again else ""), reason)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {_unsafe_reason(e)}") from e
    except Exception as e:  # zip entries torn or missing: torch's reader says RuntimeError
        reason = f"damaged checkpoint ({_first_sentence(e)})"
        raise CheckpointError(f"{path}: {reason}; {AGAIN}", reason) from e


def checkpoint_epoch(path: Path | str) -> int | None:
    """The ``epoch`` a checkpoint records, read without loading its tensors (memory-mapped);
    None when the file cannot be read or records none."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged: whoever loads it for use reports that
        return None
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return int(epoch) if isinstance(epoch, int) else None


# Model keys that do not change the weights' shapes: a run may start from another's
# checkpoint whatever their values (the checkpoint's weights replace both).
_FREE_MODEL_KEYS = ("encoder_weights", "init_bias")


def init_checkpoint(cfg: Config) -> dict | None:
    """The checkpoint ``train.init_from`` names (None when unset), checked to fit ``cfg``'s
    model: same class list, architecture, encoder and head options. Any problem is one
    ``ConfigError`` naming the key, the file and both values (progressive resizing:
    image size, patches, loss and schedule may differ)."""
    path = cfg.train.init_from
    if path is None:
        return None
    key = "train.init_from"
    try:
        ckpt = load_checkpoint(path)
        saved = config_from_saved(ckpt["config"], where=str(path))
    except (CheckpointError, ConfigError) as e:
        raise ConfigError(f"{key}: {e}", key) from None
    theirs, ours = to_dict(saved.model), to_dict(cfg.model)
    differ = [k for k in ours if k not in _FREE_MODEL_KEYS and theirs.get(k) != ours[k]]
    if differ:
        diff = ", ".join(f"model.{k} {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
        raise ConfigError(
            f"{key}: {path} is another model ({diff}); start from a checkpoint of the same "
            "architecture and encoder, or set model.* as it has",
            key,
        )
    return ckpt


def load_weights(
    model: nn.Module, state_dict: dict, path: Path | str, what: str = "weights"
) -> None:
    """``model.load_state_dict`` whose failure names the checkpoint in one line (torch
    lists every key that differs, often hundreds of lines)."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        own = model.state_dict()
        missing = len(own.keys() - state_dict.keys())
        unexpected = len(state_dict.keys() - own.keys())
        shape = sum(
            1
            for k in own.keys() & state_dict.keys()
            if getattr(state_dict[k], "shape", None) != own[k].shape
        )
        raise CheckpointError(
            f"{path}: its {what} do not fit the model its own config describes ({missing} "
            f"missing, {unexpected} unexpected, {shape} of another shape); the file is damaged "
            "or was edited"
        ) from e


def _container_problem(path: Path) -> tuple[str, bool] | None:
    """What is wrong with the file as a container, before unpickling anything, and whether
    copying or saving it again is the way out."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty file (0 bytes): not a checkpoint", True
    if zipfile.is_zipfile(path):
        return None
    if head == b"PK\x03\x04":
        return "truncated or damaged checkpoint (incomplete zip archive)", True
    return "not a PyTorch checkpoint (unknown bytes, not the zip archive torch.save writes)", False


def _unsafe_reason(error: Exception) -> str:
    """The unpickler's refusal as one line, without torch's ``weights_only=False`` advice."""
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    found = f" ({m.group(1)})" if m else ""
    return (
        f"holds Python objects other than tensors and plain data{found}: refused, since "
        "loading it could run arbitrary code; bonecomp checkpoints never hold such objects"
    )


def _first_sentence(error: BaseException) -> str:
    """The first sentence of an exception's first line (its type when it has none)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(". ")[0].rstrip(".")


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )
