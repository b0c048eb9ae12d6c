"""Where a process runs: the device, and the torchrun process group (rank, world size) with its few collectives.

Every layer that touches a device or sums over ranks (data rendering, evaluation, training, extraction) uses
these, so `auto` means the same everywhere: the local CUDA device when there is one, else CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


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
    """`auto` -> the local CUDA device when there is one, else CPU; `cuda` -> `cuda:<local_rank>`.

    A device this machine lacks (`cuda:1` with one GPU, `mps` off Apple silicon) or cannot run a model on (`meta`)
    is a ConfigError naming it, the value of `--device` or `train.device`.
    """
    name = str(name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (--device / train.device: use auto, cpu, cuda or cuda:N)"
                          ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: no CUDA device is available here; use auto or cpu")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        if dev.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r}: MPS is not available here; use auto or cpu")
        return dev
    if dev.type != "cpu":
        raise ConfigError(f"device {name!r}: modsquad runs on cpu, cuda or mps, not {dev.type}")
    return dev


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


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """A contiguous, unpadded shard of an evaluation set, so that summed metric states count each sample once."""
    per, extra = divmod(num_samples, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))
