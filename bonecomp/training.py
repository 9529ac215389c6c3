"""Train one fold end to end: data, model, loop, validation at 2048, run directory.

    runs/<experiment>/fold<k>/
        config.yaml          the resolved config
        summary.csv          one row per epoch: losses, val Dice, lr, img/s, time
        dice_per_class.csv   per-class Dice of the best epoch
        best.pt, last.pt     self-describing checkpoints (last.pt also resumes)
        oof.npy, oof_index.csv   out-of-fold probabilities of the best model (float16)

Works on CPU (float32) and CUDA (AMP, channels_last), on one device or under torchrun
(DistributedDataParallel; rank 0 writes files, metrics are reduced across ranks).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from bonecomp.checkpoint import load_checkpoint, save_checkpoint
from bonecomp.classes import CLASSES
from bonecomp.config import Config, save_config, to_dict
from bonecomp.data.augment import train_transform
from bonecomp.data.cache import TrainCache, data_cache_dir, open_cache
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.folds import folds_path, load_or_make_folds
from bonecomp.data.layout import discover
from bonecomp.engine import OOFWriter, StepContext, past, train_one_epoch, validate
from bonecomp.losses import BceDiceLoss
from bonecomp.metrics import DiceTable
from bonecomp.models import create_model


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    best_epoch: int
    epochs_done: int


def run_dir_for(cfg: Config, fold: int) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.experiment / f"fold{fold}"


def run_training(
    cfg: Config,
    fold: int,
    resume: bool = False,
    progress: bool = True,
    on_best: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train ``fold`` of ``cfg``; ``resume`` continues from ``last.pt`` of the run dir.

    ``on_best(run_dir)`` is called (on rank 0) after each new best epoch is saved; the
    train script uses it to draw the per-class chart.
    """
    if not 0 <= fold < cfg.data.n_splits:
        raise ValueError(f"fold {fold} out of range for data.n_splits={cfg.data.n_splits}")
    dist_info = _setup_distributed(cfg.train.device)
    return _run(cfg, fold, resume, progress and dist_info.main, on_best, dist_info)


def shutdown_distributed() -> None:
    """End the torchrun process group (once, after the last fold)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(cfg, fold, resume, progress, on_best, dd: Dist) -> TrainResult:
    t = cfg.train
    device = _device(t.device, dd)
    run_dir = run_dir_for(cfg, fold)
    say = tqdm.write if dd.main else (lambda *_: None)
    if resume:
        _check_resumable(cfg, run_dir)
    elif (run_dir / "last.pt").exists():  # every rank checks: no rank waits in a collective
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
            "train.experiment / delete the folder"
        )

    # Data: table -> folds (written once) -> cache (built once); rank 0 first.
    df = discover(cfg.data.root, "train", cfg.data.exclude)
    cache_dir = data_cache_dir(cfg.data.cache_dir, cfg.data.root)
    fpath = folds_path(cache_dir, cfg.data.n_splits, cfg.data.fold_seed)
    cache = None
    for turn in ("main", "others"):
        if (turn == "main") == dd.main:
            folds = load_or_make_folds(df, fpath, cfg.data.n_splits, cfg.data.fold_seed)
            cache = open_cache(df, cache_dir, cfg.data.image_size, progress=progress)
        dd.barrier()
    assert cache is not None
    is_val = (folds["fold"] == fold).to_numpy()
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"fold {fold} leaves no training or no validation images")

    soft, k = cfg.data.soft_targets, cfg.data.soft_k
    train_ds = BoneDataset(cache, train_idx, train_transform(cfg.data.augment), soft, k, True)
    val_ds = BoneDataset(cache, val_idx[dd.rank :: dd.world], None, soft, k, True)
    gen = torch.Generator()
    if dd.world > 1:
        sampler = DistributedSampler(
            train_ds, dd.world, dd.rank, shuffle=True, seed=t.seed, drop_last=True
        )
    else:
        sampler = RandomSampler(train_ds, generator=gen)
    cuda = device.type == "cuda"
    workers = cfg.data.num_workers
    loader_kw = dict(
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,  # no re-fork per epoch (~2 s each on CPU)
        worker_init_fn=_seed_worker,
    )
    train_loader = DataLoader(
        train_ds,
        t.batch_size,
        sampler=sampler,
        generator=gen,
        drop_last=len(train_ds) > t.batch_size,
        **loader_kw,
    )
    val_loader = DataLoader(val_ds, t.batch_size, shuffle=False, **loader_kw)

    # Model, optimisation. The same seed on every rank gives the same initial weights, so
    # each rank's EMA copy starts from what DDP broadcasts; data randomness differs by rank.
    _seed_everything(t.seed)
    model = create_model(cfg.model).to(device)
    _seed_everything(t.seed + dd.rank)
    amp_dtype = None
    if cuda and t.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    channels_last = t.channels_last  # also on CPU: oneDNN is 5-20% faster with it here
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema) if t.ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    updates_per_epoch = math.ceil(len(train_loader) / t.accum_steps)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(t.epochs * updates_per_epoch, 1),
        lr_min=t.lr * 0.01,
        warmup_t=int(t.warmup_epochs * updates_per_epoch),
        warmup_lr_init=t.lr * 0.01,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    train_model = model
    if dd.world > 1:
        ids = [device.index] if cuda else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ctx = StepContext(
        device, amp_dtype, scaler, t.accum_steps, t.grad_clip, channels_last, ema, progress, soft
    )
    loss_fn = BceDiceLoss(cfg.loss)

    state = {"epoch": -1, "num_updates": 0, "best_dice": -1.0, "best_epoch": -1}
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt", device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        _set_rng(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
        say(f"resumed {run_dir} after epoch {state['epoch']} (best Dice {state['best_dice']:.4f})")
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _truncate_summary(run_dir / "summary.csv", state["epoch"])
    logger = _Logger(cfg, run_dir) if dd.main else None
    names = lambda idx: cache.index["rel"].iloc[idx].tolist()  # noqa: E731

    try:
        deadline = None
        if t.max_train_minutes:
            deadline = time.monotonic() + 60 * t.max_train_minutes
        start = time.monotonic()
        epochs = range(state["epoch"] + 1, t.epochs)
        for epoch in tqdm(epochs, desc=f"fold {fold}", unit="epoch", disable=not progress):
            # Order and worker seeds per (seed, epoch, rank): reproducible, different by rank.
            gen.manual_seed((t.seed * 1_000_003 + epoch) * 1009 + dd.rank)
            if workers == 0:  # no worker to seed the augmentations: seed them here
                train_ds.transform.set_random_seed(int(torch.randint(2**31, (1,), generator=gen)))
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            row = train_one_epoch(
                train_model,
                train_loader,
                optimizer,
                scheduler,
                loss_fn,
                ctx,
                epoch,
                state["num_updates"],
                names,
                deadline,
            )
            state["num_updates"] = int(row.pop("num_updates"))
            out_of_time = deadline is not None and past(deadline)
            last = epoch == t.epochs - 1 or out_of_time
            if (epoch + 1) % t.val_every == 0 or last:
                eval_model = ema.module if ema is not None else model
                oof = _oof_writer(cfg, run_dir, cache, val_idx, dd) if t.save_oof else None
                val = validate(eval_model, val_loader, cache, loss_fn, ctx, 0.5, oof)
                row.update(val_loss=val["val_loss"], val_dice=val["dice"])
                improved = val["dice"] > state["best_dice"]
                if improved:
                    state.update(best_dice=val["dice"], best_epoch=epoch)
                if dd.main:
                    say(
                        f"epoch {epoch}: val Dice {val['dice']:.4f} (best {state['best_dice']:.4f} "
                        f"at epoch {state['best_epoch']})\n"
                        + DiceTable(val["per_class"], val["n_images"]).format_compact()
                    )
                    if improved:
                        _save_best(run_dir, cfg, fold, epoch, eval_model, val, oof is not None)
                dd.barrier()
                if dd.main and improved and on_best is not None:
                    on_best(run_dir)
            state["epoch"] = epoch
            if dd.main:
                row.update(epoch=epoch, elapsed=time.monotonic() - start)
                logger.log(row)
                _save_last(run_dir, cfg, fold, model, optimizer, scheduler, scaler, ema, state)
            dd.barrier()
            if out_of_time:
                say(f"stopping: train.max_train_minutes={t.max_train_minutes} reached")
                break
    finally:  # TensorBoard / W&B flushed even when training fails
        if logger:
            logger.close()
    return TrainResult(run_dir, state["best_dice"], state["best_epoch"], state["epoch"] + 1)


# ----------------------------------------------------------------------------- helpers
# Keys that may change when resuming: they do not alter what the run computes.
RESUME_MAY_CHANGE = {
    "data.num_workers", "train.max_train_minutes", "train.tensorboard", "train.wandb",
    "train.device", "data.cache_dir", "data.root",
}  # fmt: skip


def _check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume with a config that changes the run (the LR schedule, the data,
    the model...): the checkpoint's optimizer and schedule would silently disagree."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    old, new = _flatten(ckpt["config"]), _flatten(to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE)  # fmt: skip
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise ValueError(
            f"cannot resume {run_dir} with a different config ({diffs}); resume with the "
            f"saved one ({run_dir / 'config.yaml'}) or start a new train.experiment"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _setup_distributed(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and not device_pref.startswith("cpu")
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(pref: str, dd: Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={pref!r} but CUDA is not available")
        if dd.world > 1 and ":" in pref:
            raise ValueError(
                f"train.device={pref!r} under torchrun: use 'cuda' (each rank takes its "
                "LOCAL_RANK GPU); pick GPUs with CUDA_VISIBLE_DEVICES"
            )
        dev = torch.device(pref if ":" in pref else f"cuda:{dd.local_rank}")
        torch.cuda.set_device(dev)
        return dev
    return torch.device(pref)


# torch, numpy and random global generators are seeded and checkpointed (user code and
# some libraries draw from them: hence the legacy numpy API, ruff NPY002 silenced below).
# albumentations 2 has its own generator per Compose: _seed_worker and the epoch loop
# seed it.
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and the dataset's augmentations from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)
    ds = info.dataset.dataset if isinstance(info.dataset, Subset) else info.dataset
    if getattr(ds, "transform", None) is not None:
        ds.transform.set_random_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _meta(cfg: Config, fold: int, epoch: int) -> dict:
    return {
        "config": to_dict(cfg),
        "classes": list(CLASSES),
        "fold": fold,
        "input_size": cfg.data.image_size,
        "epoch": epoch,
    }


def _save_best(
    run_dir: Path, cfg: Config, fold: int, epoch: int, model, val: dict, has_oof: bool
) -> None:
    save_checkpoint(
        run_dir / "best.pt",
        {
            **_meta(cfg, fold, epoch),
            "model": model.state_dict(),
            "metric": val["dice"],
            "per_class": [float(v) for v in val["per_class"]],
        },
    )
    DiceTable(val["per_class"], val["n_images"]).to_frame().to_csv(
        run_dir / "dice_per_class.csv", index=False
    )
    if has_oof:
        os.replace(run_dir / ".oof.tmp.npy", run_dir / "oof.npy")
        os.replace(run_dir / ".oof_index.tmp.csv", run_dir / "oof_index.csv")


def _save_last(run_dir, cfg, fold, model, optimizer, scheduler, scaler, ema, state) -> None:
    save_checkpoint(
        run_dir / "last.pt",
        {
            **_meta(cfg, fold, state["epoch"]),
            **state,
            "metric": state["best_dice"],
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "rng": _rng_state(),
        },
    )


def _oof_writer(cfg, run_dir: Path, cache: TrainCache, val_idx, dd: Dist) -> OOFWriter:
    """A float16 memmap of all validation images of the fold, shared by the ranks."""
    size = cfg.train.oof_size
    path = run_dir / ".oof.tmp.npy"
    shape = (len(val_idx), len(CLASSES), size, size)
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, "w+", np.float16, shape).flush()
        index = cache.index.iloc[val_idx].reset_index(drop=True)
        index.insert(0, "row", np.arange(len(val_idx)))
        index.to_csv(run_dir / ".oof_index.tmp.csv", index=False)
    dd.barrier()
    array = np.load(path, mmap_mode="r+")
    row_of = {int(i): r for r, i in enumerate(val_idx)}
    return OOFWriter(array, row_of, size)


def _truncate_summary(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs after ``last_epoch`` (left by a run killed mid-write)."""
    if path.exists():
        df = pd.read_csv(path)
        df[df["epoch"] <= last_epoch].to_csv(path, index=False)


class _Logger:
    """Append-only summary.csv, plus TensorBoard / Weights & Biases when enabled."""

    COLUMNS = (
        "epoch",
        "loss",
        "bce",
        "dice",
        "val_loss",
        "val_dice",
        "lr",
        "img_s",
        "train_time",
        "elapsed",
    )

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.path = run_dir / "summary.csv"
        self.tb = self.wandb = None
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs `pip install tensorboard`") from e
            self.tb = SummaryWriter(str(run_dir / "tb"))
        if cfg.train.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.wandb=true needs `pip install wandb`") from e
            self.wandb = wandb.init(
                project="bonecomp",
                name=f"{run_dir.parent.name}/{run_dir.name}",
                config=to_dict(cfg),
                dir=str(run_dir),
            )

    def log(self, row: dict) -> None:
        values = {c: row.get(c, float("nan")) for c in self.COLUMNS}
        new = not self.path.exists()
        pd.DataFrame([values]).to_csv(self.path, mode="a", header=new, index=False)
        step = int(row["epoch"])
        if self.tb:
            for k, v in values.items():
                if k != "epoch" and v == v:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in values.items() if v == v}, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
