"""Deterministic, resumable data order for single-process and torchrun (DDP) training.

The data order is a pure function of (seed, epoch): each epoch is one `torch.randperm` from a generator seeded
with both, cut into global batches of `batch_size x world_size` samples; rank r takes the r-th slice of each.
So a resumed run skips exactly the steps it has done, and one process with a batch of B x W sees the same
samples per step as W processes with B each. Every sample also gets its own seed (from seed, epoch, index)
under which its random augmentation runs, which makes augmentation independent of worker count and order.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch: [num_samples] indices, a function of (seed, epoch) only."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(num_samples, generator=g)


class EpochBatchSampler(Sampler):
    """Batch sampler for training: this rank's share of each global batch, resumable at any step.

    Yields lists of `(index, sample_seed)` keys for `SeededDataset`; the last incomplete global batch is
    dropped so that every rank makes the same number of steps. Call `set_epoch(epoch, start_step)` before
    iterating; `start_step` skips the steps of this epoch that a resumed run has already done.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle).tolist()
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch][lo:hi]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]


def _owners(obj, depth: int = 0) -> list:
    """`obj` and the objects reachable through its attributes (and short lists), a few levels deep."""
    if depth > 3 or obj is None or isinstance(obj, (str, bytes, int, float, dict, torch.Tensor, np.ndarray)):
        return []
    if isinstance(obj, (list, tuple)) and len(obj) > 64:  # sample lists, not pipelines
        return []
    children = obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") else ()
    return [obj, *(o for c in children for o in _owners(c, depth + 1))]


def _augmentations(dataset) -> list:
    """Albumentations-like pipelines (objects with `set_random_seed`) of a dataset, outermost only."""
    found, inside = [], set()
    for o in _owners(dataset):  # parents come before their children
        if id(o) not in inside and hasattr(o, "set_random_seed"):
            found.append(o)
            inside.update(id(child) for child in _owners(o))
    return found


class SeededDataset(Dataset):
    """Runs `dataset[index]` under a per-sample seed, with the caller's RNG states restored afterwards.

    Keys are `(index, seed)` pairs from `EpochBatchSampler`. Python's, NumPy's and torch's global RNGs are
    seeded, and so are albumentations pipelines, which keep their own generator and ignore the global ones.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._augs = _augmentations(dataset)
        # JointTransform reseeds its pipeline on its first call in each DataLoader worker; let it do that
        # before the per-sample seed is set, or the first sample of every worker would escape it.
        self._worker_hooks = [o for o in _owners(dataset) if hasattr(o, "_reseed_for_worker")]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
                for owner in self._worker_hooks:
                    owner._reseed_for_worker()
                for aug in self._augs:
                    aug.set_random_seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def no_sync_unless(model: nn.Module, sync: bool):
    """DDP's `no_sync()` for gradient-accumulation micro-batches that are not the last one."""
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
