"""Self-describing checkpoints, written atomically and loaded with ``weights_only=True``.

A checkpoint carries everything inference needs: weights, the resolved config, class
names, fold, input size, epoch and metric. (Tuned thresholds live in their own JSON file,
see ``inference.thresholds``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bonecomp.classes import CLASSES
from bonecomp.fileio import atomic_write

FORMAT = "bonecomp-checkpoint-1"


class CheckpointError(ValueError):
    """A file that is not a usable bonecomp checkpoint; the message names it."""


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """``torch.save`` through ``atomic_write``: a crash never leaves a torn file."""
    with atomic_write(path, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint (tensors and plain Python only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a bonecomp checkpoint")
    if list(ckpt.get("classes", [])) != list(CLASSES):
        raise CheckpointError(f"{path}: class list differs from this version's 29 classes")
    return ckpt
