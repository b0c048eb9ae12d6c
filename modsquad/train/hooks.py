"""Hooks that ride along a training run: told the optimizer once it exists, closed when training ends.

    hooks = [FreezeHook(model, "experts", ["reshading"])]     # before the Trainer builds the optimizer
    Trainer(cfg, out, model=model, train_tasks=["reshading"], hooks=hooks).fit()

`FreezeHook` is `train --add-tasks --freeze`: `models.grow.freeze` sets requires_grad (so fully frozen
parameters stay out of the optimizer and of gradient clipping) and masks the old tasks' rows of task-indexed
tensors; attached to the optimizer, it also keeps those rows exact through weight decay and carried momentum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.grow import FrozenRows, freeze


class TrainHook:
    """The interface: `attach(optimizer)` after the trainer built it, `close()` when `fit` returns or raises."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def close(self) -> None:
        pass


class FreezeHook(TrainHook):
    """Freeze `model` for training only `new_tasks` (`mode`: none | experts | backbone, see models/grow.py)."""

    def __init__(self, model: nn.Module, mode: str, new_tasks: Sequence[str]):
        self.model = model
        self.frozen: FrozenRows = freeze(model, mode, new_tasks)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.frozen.attach(optimizer)

    def close(self) -> None:
        self.frozen.remove()

    def trainable_count(self) -> int:
        """Parameters that train: requires_grad ones, less the frozen rows of task-indexed tensors."""
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return n - sum(ids.numel() * p[0].numel() for p, ids in self.frozen.rows.values())


__all__ = ["FreezeHook", "TrainHook"]
