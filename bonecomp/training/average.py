"""Checkpoint averaging (``train.average``): ``averaged.pt``, the mean of the weights of
the last k epochs and/or of the k best validations, BatchNorm statistics recomputed on
training batches, validated and saved like ``best.pt``.

What is kept while training is bounded, whatever the run's length:

- ``last: k``: a running mean of the weights after each of the last k epochs
  (``torch.optim.swa_utils.AveragedModel``, on the CPU: one copy of the model), with the
  list of its epochs. It is saved in ``last.pt``, so a resume continues it.
- ``best: k``: at most k weight files in the fold's ``average_best/`` (rank 0 writes
  them), the k best validations so far; a better one replaces the worst (ties keep the
  earlier epoch, as ``best.pt`` does). Which files form the pool is saved in ``last.pt``;
  an evicted file is deleted only after ``last.pt`` no longer names it, so a kill at any
  point leaves a pool that matches the ``last.pt`` a resume starts from.

With both keys the mean is over the union of their epochs, each once. The weights are
those validation uses (the EMA's when ``train.ema`` is on). A run cut by
``train.max_train_minutes`` averages the epochs it reached (fewer than asked; none for
``last`` when the cut came before its last k epochs: then, without ``best``, no
``averaged.pt`` is written and the console says so). ``averaged.pt`` holds no OOF maps:
``oof.npy`` stays ``best.pt``'s (threshold tuning of an ensemble of averaged members
reads those); its validation Dice is in the file and in ``dice_per_class_averaged.csv``.
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
    """What ``train.average`` keeps between epochs (every rank holds the same lists; only
    rank 0 writes the pool's files)."""

    cfg: AverageConfig
    epochs: int  # train.epochs
    running: AveragedModel | None = None  # ``last``: the running mean (CPU)
    last_epochs: list[int] = field(default_factory=list)
    pool: list[tuple[int, float]] = field(default_factory=list)  # ``best``: (epoch, Dice)

    @classmethod
    def build(cls, cfg: AverageConfig, epochs: int, model: nn.Module) -> Averager | None:
        """None when averaging is off."""
        if cfg.last is None and cfg.best is None:
            return None
        running = None
        if cfg.last is not None:
            running = AveragedModel(model, device=torch.device("cpu"), use_buffers=False)
        return cls(cfg, epochs, running)

    # ------------------------------------------------------------------ during training
    def after_epoch(self, epoch: int, model: nn.Module) -> None:
        """Add ``model``'s weights to the running mean when ``epoch`` is one of the last k."""
        if self.running is not None and epoch >= self.epochs - self.cfg.last:
            self.running.update_parameters(model)
            self.last_epochs.append(epoch)

    def after_validation(
        self, epoch: int, dice: float, model: nn.Module, run: RunDir, main: bool
    ) -> None:
        """Keep ``model``'s weights when its Dice is among the k best so far (the file on
        rank 0)."""
        k = self.cfg.best
        if k is None:
            return
        if len(self.pool) >= k:
            worst = min(self.pool, key=lambda e: (e[1], -e[0]))  # the lowest, latest of ties
            if dice <= worst[1]:
                return
            self.pool.remove(worst)  # its file goes once last.pt no longer names it
        self.pool.append((epoch, dice))
        if main:
            run.average_pool.mkdir(parents=True, exist_ok=True)
            weights = {name: v.detach().cpu() for name, v in model.state_dict().items()}
            save_checkpoint(run.pooled(epoch), {"model": weights, "epoch": epoch, "metric": dice})

    def after_save(self, run: RunDir) -> None:
        """Rank 0, after ``last.pt`` was saved: delete pool files it no longer names."""
        keep = {run.pooled(e) for e, _ in self.pool}
        for path in run.pool_files():
            if path not in keep:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ last.pt
    def state_dict(self) -> dict:
        return {
            "running": self.running.state_dict() if self.running is not None else None,
            "last_epochs": list(self.last_epochs),
            "pool": [[e, d] for e, d in self.pool],
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Restore from ``last.pt`` (None: saved without averaging, which
        ``check_resumable`` refuses as a changed ``train.average``)."""
        if state is None:
            return
        if self.running is not None and state["running"] is not None:
            self.running.load_state_dict(state["running"])
        self.last_epochs = [int(e) for e in state["last_epochs"]]
        self.pool = [(int(e), float(d)) for e, d in state["pool"]]

    # ------------------------------------------------------------------ at the end
    def epochs_chosen(self) -> list[int]:
        """The union of the ``last`` and ``best`` epochs, sorted."""
        return sorted(set(self.last_epochs) | {e for e, _ in self.pool})

    def mean_weights(self, model: nn.Module, run: RunDir) -> dict[str, torch.Tensor] | None:
        """Rank 0: ``model``'s state dict with its parameters replaced by the mean over
        ``epochs_chosen`` (buffers stay ``model``'s: BatchNorm's are recomputed after);
        None when no epoch was collected."""
        if not self.epochs_chosen():
            return None
        avg = copy.deepcopy(self.running) if self.running is not None else None
        scratch = copy.deepcopy(model).cpu()
        for epoch in sorted(e for e, _ in self.pool if e not in self.last_epochs):
            path = run.pooled(epoch)
            load_weights(scratch, _read_pooled(path), path)
            if avg is None:
                avg = AveragedModel(scratch, device=torch.device("cpu"), use_buffers=False)
            avg.update_parameters(scratch)
        out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for (name, _), p in zip(model.named_parameters(), avg.module.parameters(), strict=True):
            out[name] = p.detach().clone().to(out[name].dtype)
        return out


def _read_pooled(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a pool file (weights only: ``load_checkpoint`` wants a run's config
    beside them, which the pool's files, not meant for inference, do not repeat)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # torn, edited or replaced: one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read train.average.best's weights ({first}); delete the fold's "
            "folder and train it again"
        ) from e


def clear_pool(run: RunDir) -> None:
    """Rank 0, a fresh run: the pool of an earlier run that never saved ``last.pt`` goes."""
    for path in run.pool_files():
        path.unlink()


def check_pool(state: dict | None, run: RunDir) -> None:
    """Before a resume (rank 0): every pool file the ``last.pt`` state names is there."""
    pool = (state or {}).get("pool", [])
    missing = [str(run.pooled(int(e))) for e, _ in pool if not run.pooled(int(e)).is_file()]
    if missing:
        raise RunError(
            f"{run}: cannot resume train.average.best without {', '.join(missing)} (kept in "
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
