"""Deterministic, resumable data order.

Epoch ``e`` visits a permutation drawn from ``(seed, e)`` alone, split across ranks like DistributedSampler
(strided, drop_last), so the order does not depend on how the run was interrupted. The stream remembers
``(epoch, batch)`` and can reopen mid-epoch at exactly that batch; epochs wrap around when the run needs
more batches than the dataset holds. The DataLoader gets its own per-epoch generator, so opening an
iterator never draws from the global torch RNG (which would make a resumed run diverge).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ..errors import DataError
from .distributed import rank, world_size

_SALT = 0x5A3B1E  # keeps these permutations independent of other users of (seed, epoch)


class ResumableSampler(Sampler[int]):
    """This rank's indices for one epoch, starting at batch ``start_batch``; whole batches only."""

    def __init__(self, length: int, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return (self.length // self.world_size) // self.batch_size

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def epoch_indices(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch, _SALT]).permutation(self.length)
        mine = perm[self.rank : (self.length // self.world_size) * self.world_size : self.world_size]
        return mine[: self.batches_per_epoch * self.batch_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.batch_size


def _seed_worker(worker_id: int) -> None:
    """numpy/random in DataLoader workers follow the worker's torch seed (itself from our generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class BatchStream:
    """Endless batches over epochs, with a saveable ``position`` = (epoch, batches consumed in it)."""

    def __init__(
        self, dataset, *, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0,
        collate_fn: Callable | None = None, pin_memory: bool = False,
    ):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.iterable = isinstance(dataset, IterableDataset)
        self.sampler = None
        if not self.iterable:
            self.sampler = ResumableSampler(
                len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size
            )
            if self.sampler.batches_per_epoch == 0:
                raise DataError(
                    f"dataset has {len(dataset)} items, fewer than one batch of {batch_size} per process "
                    f"on {world_size} process(es); lower batch_size or use more data"
                )
        self.loader_kwargs = dict(
            batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, drop_last=True,
            pin_memory=pin_memory, worker_init_fn=_seed_worker if num_workers else None,
        )
        self.epoch, self.batch = 0, 0
        self._it: Iterator | None = None

    @property
    def position(self) -> tuple[int, int]:
        if self.sampler is not None and self.batch >= self.sampler.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def seek(self, epoch: int, batch: int) -> None:
        """Continue at ``batch`` of ``epoch``; iterable datasets are replayed up to there (best effort)."""
        self.epoch, self.batch, self._it = int(epoch), 0, None
        if self.sampler is not None:
            self.batch = min(int(batch), self.sampler.batches_per_epoch)
        else:
            for _ in range(int(batch)):
                next(self)

    def _open(self) -> Iterator:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if self.sampler is not None:
            self.sampler.set_position(self.epoch, self.batch)
        seed = np.random.SeedSequence([self.seed, self.epoch, self.rank, _SALT]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))  # worker seeds come from here, not the global RNG
        return iter(DataLoader(self.dataset, sampler=self.sampler, generator=gen, **self.loader_kwargs))

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self):
        for attempt in range(2):
            if self._it is None:
                self._it = self._open()
            try:
                item = next(self._it)
                self.batch += 1
                return item
            except StopIteration:
                if attempt == 1 and self.batch == 0:
                    break
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        raise DataError("the training dataset yielded no complete batch")


def eval_batches(ds, batch_size: int, shard: bool = True, num_workers: int = 0):
    """Deterministic, in-order batches; with ``shard`` each rank takes every world_size-th item.
    ``num_workers`` > 0 decodes the next batches in other processes while the model runs."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    else:
        idx = list(range(len(ds)))
        if shard and world_size() > 1:
            idx = idx[rank():: world_size()]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                             num_workers=num_workers)
    yield from loader
