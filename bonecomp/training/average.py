"""Checkpoint averaging (``train.average``): ``averaged.pt``, the mean of the weights of
the last k epochs and/or of the k best validations, BatchNorm statistics recomputed on
training batches, validated and saved like ``best.pt``.

What is kept while training is bounded, whatever the run's length: the weights of the
chosen epochs, one file per epoch in the fold's ``average_pool/`` (rank 0 writes them;
at most k for ``last`` plus k for ``best``, an epoch both want is kept once), and in
``last.pt`` the lists of which epochs they are, so a resume continues with the same pool.

- ``last: k``: the weights after each of the last k epochs: written from epoch
  ``epochs - k`` on; under ``train.max_train_minutes`` (where the run stops is not
  known in advance) after every epoch, the oldest beyond k dropped, so a run cut by its
  time budget averages the last k epochs it reached.
- ``best: k``: the k best validations so far; a better one replaces the worst (ties keep
  the earlier epoch, as ``best.pt`` does).

A file that leaves the pool is deleted only after ``last.pt`` no longer names it, and a
resume deletes the files of the lost epoch (written after ``last.pt``), so a kill at any
point leaves the pool that the ``last.pt`` a resume starts from describes. Files, not a
running sum: a sum cannot drop its oldest epoch (the time-budget case) nor hold the
``best`` set, and one file at a time is read when averaging. With both keys the mean is
over the union of their epochs, each once. The weights are those validation uses (the
EMA's when ``train.ema`` is on). ``averaged.pt`` holds no OOF maps: ``oof.npy`` stays
``best.pt``'s (threshold tuning of an ensemble of averaged members reads those); its
validation Dice is in the file and in ``dice_per_class_averaged.csv``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader

from bonecomp.checkpoint import CheckpointError, load_weights, save_checkpoint
from bonecomp.config import AverageConfig
from bonecomp.engine import StepContext, to_device
from bonecomp.runs import RunDir, RunError


@dataclass
class Averager:
    """What ``train.average`` keeps between epochs: which epochs' weights are in the pool,
    for ``last`` and for ``best`` (every rank holds the same lists; rank 0 the files)."""

    cfg: AverageConfig
    epochs: int  # train.epochs
    timed: bool = False  # train.max_train_minutes: the run may stop before its last epoch
    last_epochs: list[int] = field(default_factory=list)  # ``last``: at most k, in order
    pool: list[tuple[int, float]] = field(default_factory=list)  # ``best``: (epoch, Dice)

    @classmethod
    def build(cls, cfg: AverageConfig, epochs: int, timed: bool) -> Averager | None:
        """None when averaging is off."""
        if cfg.last is None and cfg.best is None:
            return None
        return cls(cfg, epochs, timed)

    # ------------------------------------------------------------------ during training
    def after_epoch(self, epoch: int, model: nn.Module, run: RunDir, main: bool) -> None:
        """Keep ``model``'s weights when ``epoch`` may be one of the last k: from epoch
        ``epochs - k`` on, or every epoch under a time budget (where the run ends is not
        known; the oldest beyond k is dropped)."""
        k = self.cfg.last
        if k is None or not (self.timed or epoch >= self.epochs - k):
            return
        self._keep(epoch, model, run, main)
        self.last_epochs = [*self.last_epochs, epoch][-k:]  # the dropped file goes after_save

    def after_validation(
        self, epoch: int, dice: float, model: nn.Module, run: RunDir, main: bool
    ) -> None:
        """Keep ``model``'s weights when its Dice is among the k best so far."""
        k = self.cfg.best
        if k is None:
            return
        if len(self.pool) >= k:
            worst = min(self.pool, key=lambda e: (e[1], -e[0]))  # the lowest, latest of ties
            if dice <= worst[1]:
                return
            self.pool.remove(worst)  # its file goes once last.pt no longer names it
        self._keep(epoch, model, run, main)
        self.pool.append((epoch, dice))

    def _keep(self, epoch: int, model: nn.Module, run: RunDir, main: bool) -> None:
        """Rank 0: the epoch's weights into the pool (once, whichever role asks first;
        called before the epoch joins a list)."""
        if not main or epoch in self.epochs_chosen():
            return
        run.average_pool.mkdir(parents=True, exist_ok=True)
        weights = {name: v.detach().cpu() for name, v in model.state_dict().items()}
        save_checkpoint(run.pooled(epoch), {"model": weights, "epoch": epoch})

    def after_save(self, run: RunDir) -> None:
        """Rank 0, after ``last.pt`` was saved: delete pool files it no longer names."""
        keep = {run.pooled(e) for e in self.epochs_chosen()}
        for path in run.pool_files():
            if path not in keep:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ last.pt
    def state_dict(self) -> dict:
        return {"last_epochs": list(self.last_epochs), "pool": [[e, d] for e, d in self.pool]}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore from ``last.pt`` (None: saved without averaging, which
        ``check_resumable`` refuses as a changed ``train.average``)."""
        if state is None:
            return
        self.last_epochs = [int(e) for e in state["last_epochs"]]
        self.pool = [(int(e), float(d)) for e, d in state["pool"]]

    # ------------------------------------------------------------------ at the end
    def epochs_chosen(self) -> list[int]:
        """The union of the ``last`` and ``best`` epochs, sorted."""
        return sorted(set(self.last_epochs) | {e for e, _ in self.pool})

    def kept_for(self, epoch: int) -> str:
        """The key(s) an epoch's pool file is kept for: ``train.average.last`` / ``.best``."""
        best = {e for e, _ in self.pool}
        roles = [k for k, held in (("last", self.last_epochs), ("best", best)) if epoch in held]
        return " and ".join(f"train.average.{k}" for k in roles) or "train.average"

    def mean_weights(self, model: nn.Module, run: RunDir) -> dict[str, torch.Tensor] | None:
        """Rank 0: ``model``'s state dict with its parameters replaced by their mean over
        the pool's files of ``epochs_chosen`` (``swa_utils.AveragedModel``, one file in
        memory at a time); buffers stay ``model``'s (BatchNorm's are recomputed after).
        None when no epoch was kept."""
        avg, scratch = None, copy.deepcopy(model).cpu()
        for epoch in self.epochs_chosen():
            path = run.pooled(epoch)
            load_weights(scratch, _read_pooled(path, epoch, self.kept_for(epoch)), path)
            if avg is None:
                avg = AveragedModel(scratch, device=torch.device("cpu"), use_buffers=False)
            avg.update_parameters(scratch)
        if avg is None:
            return None
        out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for (name, _), p in zip(model.named_parameters(), avg.module.parameters(), strict=True):
            out[name] = p.detach().clone().to(out[name].dtype)
        return out


def _read_pooled(path: Path, epoch: int, kept_for: str) -> dict[str, torch.Tensor]:
    """The weights of a pool file (weights only: ``load_checkpoint`` wants a run's config
    beside them, which the pool's files, not meant for inference, do not repeat)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # torn, edited or replaced: one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read the weights of epoch {epoch} kept for {kept_for} "
            f"({first.split('. ')[0]}); averaged.pt cannot be made without them: restore the "
            "file if you have a copy; the fold's best.pt and last.pt are whole and usable "
            "(infer.ensemble checkpoint: best or last)"
        ) from e


def clear_pool(run: RunDir) -> None:
    """Rank 0, a fresh run: the pool of an earlier run that never saved ``last.pt`` goes."""
    for path in run.pool_files():
        path.unlink()


def check_pool(state: dict | None, run: RunDir) -> None:
    """Before a resume (rank 0): every pool file the ``last.pt`` state names is there."""
    state = state or {}
    epochs = sorted({*state.get("last_epochs", []), *(e for e, _ in state.get("pool", []))})
    missing = [str(run.pooled(int(e))) for e in epochs if not run.pooled(int(e)).is_file()]
    if missing:
        raise RunError(
            f"{run}: cannot resume train.average without {', '.join(missing)} (kept in "
            f"{run.average_pool.name}/); restore it or start a new train.experiment"
        )


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_bn(model: nn.Module, loader: DataLoader, ctx: StepContext) -> int:
    """BatchNorm running statistics of ``model`` recomputed over one pass of ``loader``
    (``swa_utils.update_bn``: a cumulative mean over the batches), each batch in forwards
    of at most ``ctx.micro_batch`` images; returns the number of forwards (0: no BatchNorm,
    nothing done)."""
    if not has_batchnorm(model):
        return 0
    n = 0

    def images() -> Iterator[torch.Tensor]:
        nonlocal n
        for batch in loader:
            x = to_device(batch, ctx)["image"]
            step = ctx.micro_batch or x.shape[0]
            for i in range(0, x.shape[0], step):
                n += 1
                yield x[i : i + step]

    update_bn(images(), model)
    return n
