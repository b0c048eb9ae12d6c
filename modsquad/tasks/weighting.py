"""Task loss weighting strategies (LibMTL style): one class per method, all behind one base.

A weighting is an `nn.Module` so learned weights (uncertainty) train with the model and any history (DWA)
lands in the checkpoint's state_dict. The trainer calls `total, weights = weighting(losses)` every
step and `weighting.end_epoch(avg_losses)` after each epoch; `weights` are plain floats for logging.
A new method is one subclass registered with `@register_weighting("name")`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import UnknownNameError

WEIGHTINGS: dict[str, type[Weighting]] = {}


def register_weighting(name: str):
    """Class decorator: make a `Weighting` buildable by name (`train.weighting` in the config)."""

    def register(cls: type[Weighting]) -> type[Weighting]:
        WEIGHTINGS[name] = cls
        cls.name = name
        return cls

    return register


class Weighting(nn.Module):
    """Base: combine per-task losses into one scalar.

    Args:
        tasks: the task names, in a fixed order (the index of a task in learned/buffered tensors).
    """

    name = ""

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        if not tasks:
            raise ValueError("a loss weighting needs at least one task")
        self.tasks = list(tasks)
        self._index = {t: i for i, t in enumerate(self.tasks)}

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """losses: task -> scalar (a subset of `tasks` is fine) -> (total scalar, task -> weight)."""
        raise NotImplementedError

    def end_epoch(self, avg_losses: Mapping[str, float]) -> None:
        """Called by the trainer with each task's mean training loss over the epoch that just ended."""

    def _indices(self, losses: Mapping[str, Tensor]) -> list[int]:
        unknown = [t for t in losses if t not in self._index]
        if unknown:
            raise KeyError(f"{type(self).__name__}: losses for unknown task(s) {unknown}; tasks are {self.tasks}")
        return [self._index[t] for t in losses]

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


@register_weighting("equal")
class EqualWeighting(Weighting):
    """Sum of the task losses (every weight 1)."""

    def forward(self, losses):
        self._indices(losses)
        return torch.stack([v for v in losses.values()]).sum(), dict.fromkeys(losses, 1.0)


@register_weighting("uncertainty")
class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Learns s_t = log sigma_t^2 per task: total = sum_t exp(-s_t) L_t + s_t. `log_vars` is a registered
    parameter so the optimiser trains it (keep it out of weight decay).
    """

    def __init__(self, tasks: Sequence[str], init: float = 0.0):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def forward(self, losses):
        idx = self._indices(losses)
        s = self.log_vars[torch.tensor(idx, device=self.log_vars.device)]
        values = torch.stack([v.to(s.dtype) for v in losses.values()])
        total = (torch.exp(-s) * values + s).sum()
        weights = torch.exp(-s).detach().tolist()
        return total, dict(zip(losses, weights, strict=True))


@register_weighting("uncertainty_official")
class OfficialUncertaintyWeighting(Weighting):
    """The official Mod-Squad form of uncertainty weighting (util/AutomaticWeightedLoss.py).

    Learns s_t (init 1): total = sum_t 0.5 / s_t^2 * L_t + log(1 + s_t^2). Unlike `uncertainty` the
    regulariser log(1 + s^2) stays positive, so the weights cannot run away when a loss reaches zero.
    """

    def __init__(self, tasks: Sequence[str], init: float = 1.0):
        super().__init__(tasks)
        self.params = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def forward(self, losses):
        idx = self._indices(losses)
        s2 = self.params[torch.tensor(idx, device=self.params.device)].square()
        values = torch.stack([v.to(s2.dtype) for v in losses.values()])
        total = (0.5 / s2 * values + torch.log1p(s2)).sum()
        return total, dict(zip(losses, (0.5 / s2).detach().tolist(), strict=True))


@register_weighting("dwa")
class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    From the third epoch on, lambda_t = T_n exp(r_t / temperature) / sum_i exp(r_i / temperature) with
    r_t = L_t(e-1) / L_t(e-2), the ratio of the last two epochs' mean losses (T_n = number of tasks, so the
    weights sum to the number of tasks); the first two epochs use weight 1. The loss history is a buffer,
    so resuming from a checkpoint keeps it.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        self.temperature = temperature
        self.register_buffer("history", torch.zeros(2, len(self.tasks), dtype=torch.float64))  # [e-2, e-1]
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambdas", torch.ones(len(self.tasks), dtype=torch.float64))

    def end_epoch(self, avg_losses):
        missing = [t for t in self.tasks if t not in avg_losses]
        if missing:
            raise KeyError(f"DynamicWeightAverage.end_epoch: no average loss for task(s) {missing}")
        latest = torch.tensor([float(avg_losses[t]) for t in self.tasks], dtype=torch.float64)
        self.history.copy_(torch.stack([self.history[1], latest.to(self.history.device)]))
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)
            self.lambdas.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))

    def forward(self, losses):
        idx = self._indices(losses)
        values = torch.stack(list(losses.values()))
        lam = self.lambdas[torch.tensor(idx, device=self.lambdas.device)]
        total = (lam.to(device=values.device, dtype=values.dtype) * values).sum()
        return total, dict(zip(losses, lam.tolist(), strict=True))


def build_weighting(name: str, tasks: Sequence[str], **kwargs) -> Weighting:
    """A weighting by registered name (`equal`, `uncertainty`, `dwa`); kwargs go to its constructor."""
    try:
        cls = WEIGHTINGS[name]
    except KeyError:
        raise UnknownNameError(f"unknown loss weighting {name!r}; known: {', '.join(sorted(WEIGHTINGS))}") from None
    return cls(tasks, **kwargs)
