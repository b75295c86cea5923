"""Data loaders that keep their workers: one training loader for the whole run, whose batch
sampler is told each epoch's order, and validation loaders built once.

Workers persist across epochs and validations (no respawn), memory is pinned for CUDA, each
worker prefetches, and workers leave the stop signals to the main process (a signal to the whole
process group must not kill them before last.pt is saved). So that a run resumed mid-epoch (new
workers) draws the same augmentations as an uninterrupted one (workers that lived on), a worker
seeds the random generators for each sample from (run seed, epoch, sample index) before loading it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info

from dyrelu.errors import BadValueError

from .distributed import DistInfo
from .signals import leave_stop_signals_to_main

if TYPE_CHECKING:
    from .tasks.base import Task

PREFETCH_FACTOR = 2  # batches in flight per worker


def epoch_indices(n: int, seed: int, epoch: int, global_batch: int, dist: DistInfo, shuffle: bool = True) -> list[int]:
    """This rank's sample order for one epoch: a seeded permutation cut to full global batches,
    then strided over ranks, so the union of the ranks' batches is the 1-process batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)) if shuffle else torch.arange(n)
    order = order[: (n // global_batch) * global_batch]
    return order[dist.rank :: dist.world_size].tolist()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63


class EpochBatchSampler(Sampler):
    """This rank's batches of (index, seed) pairs: ``set_epoch(epoch, first, count)`` picks
    batches ``first .. first + count - 1`` of that epoch's order (epoch_indices)."""

    def __init__(self, n: int, seed: int, per_rank_batch: int, dist: DistInfo):
        self.n, self.seed, self.batch, self.dist = n, seed, per_rank_batch, dist
        self.epoch, self.first, self.count = 0, 0, 0

    def set_epoch(self, epoch: int, first: int = 0, count: Optional[int] = None) -> None:
        total = self.n // (self.batch * self.dist.world_size)
        self.epoch, self.first = epoch, first
        self.count = max(0, min(total - first, total if count is None else count))

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_indices(self.n, self.seed, self.epoch, self.batch * self.dist.world_size, self.dist)
        for b in range(self.first, self.first + self.count):
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in order[b * self.batch: (b + 1) * self.batch]]


class SeededSamples(Dataset):
    """``dataset[(index, seed)]``: in a worker process, seed torch, numpy and random first."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        # In the main process (num_workers=0) the loop's own seeding per epoch governs, as the
        # model's randomness (dropout) shares those generators.
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        return self.dataset[index]


def _loader_kwargs(num_workers: int) -> dict:
    kwargs = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available())
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR, worker_init_fn=leave_stop_signals_to_main)
    return kwargs


def make_train_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int, collate_fn=None) -> DataLoader:
    """The training loader, with a generator of its own (the loop seeds it each epoch): starting
    an iterator draws its base seed from it rather than from torch's global generator."""
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                      generator=torch.Generator(), **_loader_kwargs(num_workers))


def make_loader(dataset, indices, batch_size, num_workers, seed, collate_fn=None, drop_last=False) -> DataLoader:
    """A loader over ``dataset[indices]`` in that order (validation, evaluation), workers kept."""
    return DataLoader(
        Subset(dataset, indices), batch_size=batch_size, shuffle=False, drop_last=drop_last, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed), **_loader_kwargs(num_workers),
    )


def val_indices(n: int, dist: DistInfo, limit_batches: Optional[int], per_rank_batch: int) -> tuple[list[int], int]:
    """This rank's validation samples (strided over ranks) and the number of batches every rank has."""
    def share(rank):
        idx = list(range(rank, n, dist.world_size))
        return idx[: limit_batches * per_rank_batch] if limit_batches else idx

    common = min(math.ceil(len(share(r)) / per_rank_batch) for r in range(dist.world_size))
    return share(dist.rank), common


@dataclass
class Data:
    """The loaders of one run and the numbers the loop needs from them."""
    train_loader: torch.utils.data.DataLoader
    sampler: EpochBatchSampler          # tells the training loader each epoch's batches
    val_loader: torch.utils.data.DataLoader
    val_common: int                     # validation batches that every rank has
    steps_per_epoch: int                # full global batches in the training set
    num_steps: int                      # steps trained per epoch (trainer.limit_train_batches)


def build_data(cfg, task: Task, dist: DistInfo) -> Data:
    """The task's datasets and persistent loaders: training batches strided over ranks from one
    seeded order per epoch, validation samples strided over ranks."""
    d, trainer = cfg.data, cfg.trainer
    if d.batch_size % dist.world_size:
        raise BadValueError(f"data.batch_size={d.batch_size} (global) is not divisible by the {dist.world_size} ranks")
    per_rank_batch = d.batch_size // dist.world_size
    train_ds, val_ds = task.build_datasets()
    steps_per_epoch = len(train_ds) // d.batch_size
    if steps_per_epoch == 0:
        raise BadValueError(f"the training set has {len(train_ds)} samples, fewer than one global batch (data.batch_size={d.batch_size})")
    sampler = EpochBatchSampler(len(train_ds), int(cfg.seed), per_rank_batch, dist)
    val_share, val_common = val_indices(len(val_ds), dist, trainer.limit_val_batches, per_rank_batch)
    return Data(
        train_loader=make_train_loader(train_ds, sampler, int(d.num_workers), task.collate_fn()), sampler=sampler,
        val_loader=make_loader(val_ds, val_share, per_rank_batch, int(d.num_workers), int(cfg.seed), task.collate_fn()),
        val_common=val_common, steps_per_epoch=steps_per_epoch,
        num_steps=min(steps_per_epoch, trainer.limit_train_batches or steps_per_epoch),
    )
