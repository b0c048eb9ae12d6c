"""Single-process and torchrun (DDP) training helpers: process group, device, deterministic data order.

The data order is a pure function of (seed, epoch): each epoch is one `torch.randperm` from a generator seeded
with both, cut into global batches of `batch_size x world_size` samples; rank r takes the r-th slice of each.
So a resumed run skips exactly the steps it has done, and one process with a batch of B x W sees the same
samples per step as W processes with B each. Every sample also gets its own seed (from seed, epoch, index)
under which its random augmentation runs, which makes augmentation independent of worker count and order.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: `rank` of `world_size` processes, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> the local CUDA device when there is one, else CPU; `cuda` -> `cuda:<local_rank>`."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (a plain `modsquad train`) this is a single process. NCCL is used for CUDA
    devices, gloo for CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op on one process); returns `t`."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """A contiguous, unpadded shard of an evaluation set, so that summed metric states count each sample once."""
    per, extra = divmod(num_samples, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


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
