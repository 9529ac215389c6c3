"""Data of one fold: table -> folds (written once) -> cache (built once) -> loaders.

With ``train.pseudo_labels`` the pseudo-label folder's test images join the training
loader of every fold (never validation, so folds, validation and OOF are unchanged);
``MixSampler`` draws each real training image once per epoch plus
``train.pseudo_weight`` x the pseudo images.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from bonecomp.config import Config, ConfigError, source_of
from bonecomp.data.annotations import AnnotationError
from bonecomp.data.augment import build_augmentation
from bonecomp.data.cache import (
    CacheError,
    CacheSpec,
    TrainCache,
    content_digest,
    data_cache_dir,
    open_cache,
)
from bonecomp.data.dataset import BoneDataset
from bonecomp.data.folds import FoldsError, folds_path, load_or_make_folds, stratify_table
from bonecomp.data.images import ImageReadError
from bonecomp.data.layout import DataLayoutError
from bonecomp.data.patches import PatchSampler, class_weights, polygon_areas
from bonecomp.data.preprocess import Preprocess
from bonecomp.data.pseudo_dir import PseudoDataset, PseudoError, PseudoSet, open_pseudo
from bonecomp.data.sample import Sample
from bonecomp.distributed import Dist, RankError, all_gather_object, run_agreed, where
from bonecomp.fileio import OutputError
from bonecomp.losses import loss_fields
from bonecomp.workers import end_with_parent

# Problems of a node's data or disk: under torchrun each ends every rank in one line.
DATA_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataLayoutError, CacheError, FoldsError, AnnotationError, ImageReadError,
    PseudoError, OutputError,
)  # fmt: skip


@dataclass
class FoldData:
    """The cache, the fold's split and its two loaders."""

    cache: TrainCache
    train_idx: np.ndarray
    val_idx: np.ndarray
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator  # draws the epoch's order and worker seeds
    pseudo: PseudoSet | None = None  # training items with index >= len(cache) are its rows

    def image_names(self, idx) -> list[str]:
        """Relative paths of cache rows, or ``pseudo <rel>`` of pseudo-label rows (for
        messages naming images)."""
        n, rel = len(self.cache), self.cache.index["rel"]
        extra = self.pseudo.index["rel"] if self.pseudo is not None else None
        return [rel.iloc[i] if i < n else f"pseudo {extra.iloc[i - n]}" for i in map(int, idx)]

    def start_epoch(self, seed: int, epoch: int, rank: int) -> None:
        """Seed order and augmentations per (seed, epoch, rank): reproducible on resume,
        different on each rank."""
        self.generator.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
        sampler = self.train_loader.sampler
        if isinstance(sampler, DistributedSampler | MixSampler):
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
    """Folds and cache of the training table.

    Each node's local rank 0 builds or checks its own cache and folds (no shared file
    system is needed; on a shared one the cache's lock lets one build and the others
    load), then the node's other ranks load them. Before training, every rank's cache
    content hash and folds are compared: a node with other data ends the job on every
    rank in one line naming it (``RankError``).
    """
    cache_dir = data_cache_dir(cfg.data.cache_dir, cfg.data.root)
    d = cfg.data
    fpath = folds_path(cache_dir, d.n_splits, d.fold_seed, d.fold_stratify)

    def load() -> tuple[pd.DataFrame, TrainCache]:
        strata = None  # measured before the cache: too few bent hands is one line, at once
        if d.fold_stratify and not fpath.exists():
            strata = stratify_table(table, d.fold_stratify, d.n_splits)
        cache = open_cache(table, cache_dir, CacheSpec.from_config(cfg), progress=progress)
        kept = table[table["rel"].isin(set(cache.index["rel"]))]  # minus skipped images
        folds = load_or_make_folds(kept, fpath, d.n_splits, d.fold_seed, d.fold_stratify, strata)
        return folds, cache

    first = run_agreed(load, DATA_ERRORS, on=dd.local_rank == 0)
    result = run_agreed(load, DATA_ERRORS, on=dd.local_rank != 0) or first
    assert result is not None
    _same_data_on_every_rank(*result, fpath)
    return result


def _same_data_on_every_rank(folds: pd.DataFrame, cache: TrainCache, fpath: Path) -> None:
    """Raise ``RankError`` on every rank when any rank's cache content or folds differ
    from rank 0's (a no-op on one process)."""
    split = folds[["image", "patient", "fold"]].to_csv(index=False).encode()
    mine = (where(), content_digest(cache.dir), hashlib.sha256(split).hexdigest(), str(fpath))
    every = all_gather_object(mine)
    for rank_at, cache_hash, folds_hash, path in every[1:]:
        ref_at, ref_cache, ref_folds, _ = every[0]
        if cache_hash != ref_cache:
            raise RankError(
                f"{rank_at} has other training data than {ref_at}: its cache "
                f"{cache.dir.name} hashes to {cache_hash[:12]}, rank 0's to {ref_cache[:12]}; "
                "every node needs the same data.root (copy node 0's) and the same data.* "
                "settings"
            )
        if folds_hash != ref_folds:
            raise RankError(
                f"{rank_at} has other folds than {ref_at} ({path} hashes to "
                f"{folds_hash[:12]}, rank 0's to {ref_folds[:12]}); delete it on that node "
                "or copy node 0's"
            )


def open_pseudo_labels(cfg: Config, table: pd.DataFrame) -> PseudoSet | None:
    """The folder of ``train.pseudo_labels`` (None when unset), checked against the run:
    built at ``data.image_size`` with the run's ``data.preprocess``, readable, and holding
    no image or patient of the training table (a pseudo image of a validation patient
    would leak into training).
    Any problem is a ``ConfigError`` naming the key."""
    folder = cfg.train.pseudo_labels
    if folder is None:
        return None
    key = "train.pseudo_labels"
    where = f"{source_of(cfg, key)}: {key}={folder}"
    try:
        pseudo = open_pseudo(folder)
    except PseudoError as e:
        raise ConfigError(f"{where}: {e}", key) from None
    if pseudo.size != cfg.data.image_size:
        raise ConfigError(
            f"{where}: written at {pseudo.size} px but data.image_size is "
            f"{cfg.data.image_size}; write it at this size (scripts/pseudo_label.py "
            f"data.image_size={cfg.data.image_size})",
            key,
        )
    have, want = pseudo.meta.get("preprocess", ""), Preprocess.of(cfg.data).label
    if have != want:
        raise ConfigError(
            f"{where}: its images were written with data.preprocess {have or 'none'} but this "
            f"run has {want or 'none'}; write it with this run's data section "
            "(scripts/pseudo_label.py with the same data.preprocess)",
            key,
        )
    for col, what in (("name", "image(s)"), ("patient", "patient(s)")):
        both = sorted(set(pseudo.index[col]) & set(table[col]))
        if both:
            raise ConfigError(
                f"{where}: holds training {what} {both[:3]}{' ...' if len(both) > 3 else ''}; "
                "pseudo-labels are for images outside the training set (the test split)",
                key,
            )
    return pseudo


class TrainMix(ConcatDataset):
    """Real training items, then pseudo-label items; ``transform`` is their shared
    augmentation (``seed_worker`` and ``FoldData.start_epoch`` seed it)."""

    def __init__(self, real: BoneDataset, pseudo: PseudoDataset) -> None:
        super().__init__([real, pseudo])
        self.transform = real.transform


class MixSampler(Sampler[int]):
    """Each epoch: every real item once plus ``round(weight x n_pseudo)`` pseudo items
    (each pseudo item ``floor(weight)`` times and a random share of them once more), in a
    random order; real items are ``0..n_real-1``, pseudo items follow.

    On one process the order comes from ``generator`` (reseeded per epoch by
    ``FoldData.start_epoch``). Under DDP every rank draws the same order from
    ``seed + epoch`` (``set_epoch``) and takes every ``world``-th item of it, all ranks the
    same number (the rest is dropped, like ``DistributedSampler(drop_last=True)``).
    """

    def __init__(
        self,
        n_real: int,
        n_pseudo: int,
        weight: float,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        self.n_real, self.n_pseudo, self.weight = n_real, n_pseudo, weight
        self.generator, self.rank, self.world, self.seed = generator, rank, world, seed
        self.epoch = 0
        whole = math.floor(weight)
        self.extra = round((weight - whole) * n_pseudo)
        self.total = n_real + whole * n_pseudo + self.extra

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world

    def __iter__(self) -> Iterator[int]:
        if self.world > 1 or self.generator is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
        else:
            g = self.generator
        pseudo = torch.arange(self.n_pseudo) + self.n_real
        parts = [torch.arange(self.n_real)] + [pseudo] * math.floor(self.weight)
        parts.append(pseudo[torch.randperm(self.n_pseudo, generator=g)[: self.extra]])
        items = torch.cat(parts)
        order = items[torch.randperm(len(items), generator=g)]
        order = order[: len(self) * self.world][self.rank :: self.world]
        return iter(order.tolist())


def build_loaders(
    cfg: Config,
    cache: TrainCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    dd: Dist | None = None,
    pin_memory: bool = False,
    pseudo: PseudoSet | None = None,
) -> FoldData:
    """Training loader (augmented, shuffled per epoch; plus ``pseudo``'s images when given)
    and validation loader (this rank's share of the fold), both yielding compact uint8
    batches (see ``BoneDataset``). Their items are made by one contract each
    (``train_sample``, ``val_sample``: the fields the loss reads), real and pseudo-label
    items by the same one, and collated by it."""
    d, t = cfg.data, cfg.train
    dd = dd or Dist()
    jitter = d.crop_jitter if d.crop else 0.0
    patch = patch_sampler(cfg, cache, train_idx)
    train_contract, val_contract = train_sample(cfg), val_sample(cfg)
    augment = build_augmentation(
        d.augment, crop_jitter=jitter, soft=d.soft_targets, patch=patch is not None
    )
    train_ds = BoneDataset(
        cache, train_idx, augment, soft_targets=d.soft_targets,
        soft_k=d.soft_k, compact=True, patch=patch, sample=train_contract,
    )  # fmt: skip
    val_ds = BoneDataset(
        cache, val_idx[dd.rank :: dd.world], None, soft_targets=d.soft_targets, soft_k=d.soft_k,
        compact=True, sample=val_contract,
    )  # fmt: skip
    gen = torch.Generator()
    if pseudo is not None:
        extra = PseudoDataset(
            pseudo, train_ds.transform, t.pseudo_rule, t.pseudo_confidence, d.soft_targets,
            offset=len(cache), patch=patch, sample=train_contract,
        )  # fmt: skip
        train_ds = TrainMix(train_ds, extra)
        sampler = MixSampler(
            len(train_idx), len(pseudo), t.pseudo_weight, gen, dd.rank, dd.world, t.seed
        )
    elif dd.world > 1:
        sampler = DistributedSampler(
            train_ds, dd.world, dd.rank, shuffle=True, seed=t.seed, drop_last=True
        )
    else:
        sampler = RandomSampler(train_ds, generator=gen)
    loader_kw = dict(
        num_workers=d.num_workers,
        pin_memory=pin_memory,
        persistent_workers=d.num_workers > 0,  # no re-fork per epoch (~2 s each on CPU)
        worker_init_fn=partial(seed_worker, parent=os.getpid()),  # the loader's parent
    )
    train_loader = DataLoader(
        train_ds,
        t.batch_size,
        sampler=sampler,
        generator=gen,
        drop_last=len(train_ds) > t.batch_size,
        collate_fn=train_contract.collate,
        **loader_kw,
    )
    val_loader = DataLoader(
        val_ds, val_batch_size(cfg), shuffle=False, collate_fn=val_contract.collate, **loader_kw
    )
    return FoldData(cache, train_idx, val_idx, train_loader, val_loader, gen, pseudo)


def train_sample(cfg: Config) -> Sample:
    """What a training item carries: the built-in fields (``origin`` with
    ``data.patch_size``) and those the configured loss terms read."""
    return Sample(loss_fields(cfg.loss), patch=cfg.data.patch_size is not None)


def val_sample(cfg: Config) -> Sample:
    """What a validation item carries: whole images, with the fields the loss reads (the
    loss is called on validation batches too)."""
    return Sample(loss_fields(cfg.loss))


def patch_sampler(cfg: Config, cache: TrainCache, train_idx: np.ndarray) -> PatchSampler | None:
    """``data.patch_size``'s sampler, its class weights from the training rows' polygon
    areas (relative to each image's size); None for whole-image training."""
    d = cfg.data
    if d.patch_size is None:
        return None
    areas = np.stack(
        [polygon_areas(cache.polygons(i)) / np.prod(cache.src_hw(i)) for i in map(int, train_idx)]
    )
    return PatchSampler(d.patch_size, d.patch_foreground, class_weights(areas, d.patch_balance))


def val_batch_size(cfg: Config) -> int:
    """Validation images per batch: ``train.batch_size``, or with patches as many whole
    images as hold the pixels of a training batch (at least one)."""
    b, p, s = cfg.train.batch_size, cfg.data.patch_size, cfg.data.image_size
    return b if p is None else max(1, b * p * p // (s * s))


def seed_worker(worker_id: int, parent: int | None = None) -> None:
    """End with ``parent`` (``bonecomp.workers``), then seed numpy, random and the
    dataset's augmentations from torch's per-worker seed.

    albumentations 2 has its own generator per Compose, so it is seeded explicitly.
    """
    if parent is not None:
        end_with_parent(parent)
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)  # noqa: NPY002 - libraries draw from the legacy global generator
    random.seed(seed)
    ds = info.dataset.dataset if isinstance(info.dataset, Subset) else info.dataset
    if getattr(ds, "transform", None) is not None:
        ds.transform.set_random_seed(seed)
