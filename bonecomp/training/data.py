"""Data of one fold: table -> folds (written once) -> cache (built once) -> loaders."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from bonecomp.config import Config
from bonecomp.data.augment import train_transform
from bonecomp.data.cache import TrainCache, data_cache_dir, open_cache
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.folds import folds_path, load_or_make_folds
from bonecomp.distributed import Dist


@dataclass
class FoldData:
    """The cache, the fold's split and its two loaders."""

    cache: TrainCache
    train_idx: np.ndarray
    val_idx: np.ndarray
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator  # draws the epoch's order and worker seeds

    def image_names(self, idx) -> list[str]:
        """Relative paths of cache rows (for messages naming images)."""
        return self.cache.index["rel"].iloc[list(idx)].tolist()

    def start_epoch(self, seed: int, epoch: int, rank: int) -> None:
        """Seed order and augmentations per (seed, epoch, rank): reproducible on resume,
        different on each rank."""
        self.generator.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
        sampler = self.train_loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        ds = self.train_loader.dataset
        if self.train_loader.num_workers == 0 and ds.transform is not None:
            # no worker to seed the augmentations: seed them here
            ds.transform.set_random_seed(int(torch.randint(2**31, (1,), generator=self.generator)))


def fold_split(folds: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of ``fold``; both must be non-empty."""
    is_val = (folds["fold"] == fold).to_numpy()
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"fold {fold} leaves no training or no validation images")
    return train_idx, val_idx


def prepare_cache(
    cfg: Config, table: pd.DataFrame, dd: Dist, progress: bool
) -> tuple[pd.DataFrame, TrainCache]:
    """Folds and cache of the training table; rank 0 makes them, the others then load."""
    cache_dir = data_cache_dir(cfg.data.cache_dir, cfg.data.root)
    fpath = folds_path(cache_dir, cfg.data.n_splits, cfg.data.fold_seed)
    result = None
    for turn in ("main", "others"):
        if (turn == "main") == dd.main:
            d = cfg.data
            margin = d.crop_margin if d.crop else None  # carpal: a cache of carpal boxes
            cache = open_cache(
                table,
                cache_dir,
                d.image_size,
                progress=progress,
                on_bad_image=d.on_bad_image,
                crop_margin=margin,
            )
            table = table[table["rel"].isin(set(cache.index["rel"]))]  # minus skipped images
            result = load_or_make_folds(table, fpath, d.n_splits, d.fold_seed), cache
        dd.barrier()
    assert result is not None
    return result


def build_loaders(
    cfg: Config,
    cache: TrainCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    dd: Dist | None = None,
    pin_memory: bool = False,
) -> FoldData:
    """Training loader (augmented, shuffled per epoch) and validation loader (this rank's
    share of the fold), both yielding compact uint8 batches (see ``BoneDataset``)."""
    d, t = cfg.data, cfg.train
    dd = dd or Dist()
    jitter = d.crop_jitter if d.crop else 0.0
    train_ds = BoneDataset(
        cache, train_idx, train_transform(d.augment, jitter), d.soft_targets, d.soft_k, True
    )
    val_ds = BoneDataset(cache, val_idx[dd.rank :: dd.world], None, d.soft_targets, d.soft_k, True)
    gen = torch.Generator()
    if dd.world > 1:
        sampler = DistributedSampler(
            train_ds, dd.world, dd.rank, shuffle=True, seed=t.seed, drop_last=True
        )
    else:
        sampler = RandomSampler(train_ds, generator=gen)
    loader_kw = dict(
        num_workers=d.num_workers,
        pin_memory=pin_memory,
        persistent_workers=d.num_workers > 0,  # no re-fork per epoch (~2 s each on CPU)
        worker_init_fn=seed_worker,
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
    return FoldData(cache, train_idx, val_idx, train_loader, val_loader, gen)


def seed_worker(worker_id: int) -> None:
    """Seed numpy, random and the dataset's augmentations from torch's per-worker seed.

    albumentations 2 has its own generator per Compose, so it is seeded explicitly.
    """
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)  # noqa: NPY002 - libraries draw from the legacy global generator
    random.seed(seed)
    ds = info.dataset.dataset if isinstance(info.dataset, Subset) else info.dataset
    if getattr(ds, "transform", None) is not None:
        ds.transform.set_random_seed(seed)
