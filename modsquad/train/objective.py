"""The training objective: the one place that turns a forward's outputs into the loss that is minimised.

    objective = build_objective(cfg, tasks, device)
    loss = objective(model, preds, targets, masks)      # Loss(total, terms, weights)

total = weighting({task: task loss}) + sum over aux terms of aux.<name> x term, clamped to +-train.loss_clamp.
Task losses come from the task registry (`TaskSpec.loss`) unless `train.task_losses` names another; the
weighting is `train.weighting` (tasks/weighting.py). Aux terms are the router losses the model computes
(`model.aux_losses()`: mi, balance, z) plus any function registered here with `@aux_term("name")`; each is
logged as `aux/<name>` and weighted by `aux.<name>` (a term whose weight is 0 or missing is logged, not trained).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..core.devices import DistContext, all_reduce_sum
from ..core.errors import ConfigError
from ..tasks import get_task
from ..tasks import losses as task_losses
from ..tasks.weighting import Weighting, build_weighting

#: name -> fn(model, preds) -> scalar tensor: aux losses computed by the trainer from a forward (the router
#: losses of `model.aux_losses()` need no entry). Register with `@aux_term("name")`; weight: `aux.<name>`.
AUX_TERMS: dict[str, Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]] = {}


def aux_term(name: str):
    """Register `fn(model, preds) -> scalar` as the aux loss `name` (logged as aux/<name>, weight aux.<name>)."""
    def register(fn):
        if name in AUX_TERMS:
            raise ValueError(f"aux term {name!r} is already registered")
        AUX_TERMS[name] = fn
        return fn
    return register


@dataclass
class Loss:
    """One forward's loss: `total` (what backward runs on, clamped), `terms` ({"loss/<task>", "aux/<name>",
    "loss": unclamped total}: scalar tensors, logged) and `weights` ({task: weight the weighting gave})."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]


class Objective:
    """Task losses, their weighting, weighted aux terms and the clamp; holds no state but the weighting's."""

    def __init__(self, tasks: list[str], weighting: Weighting, aux_weights: Mapping[str, float],
                 task_loss_names: Mapping[str, str] | None = None, clamp: float | None = None):
        self.tasks, self.weighting, self.clamp = list(tasks), weighting, clamp
        self.aux_weights = dict(aux_weights)
        self.task_loss_names = dict(task_loss_names or {})

    def task_losses(self, preds: Mapping[str, torch.Tensor], targets: Mapping, masks: Mapping
                    ) -> dict[str, torch.Tensor]:
        """{task: scalar loss}; preds/targets [B, C, H, W] (or [B, classes]), masks [B, H, W] where given."""
        return {t: task_losses.task_loss(get_task(t), preds[t], targets[t], masks.get(t),
                                         loss=self.task_loss_names.get(t)) for t in self.tasks}

    def aux_losses(self, model: nn.Module, preds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: unweighted scalar}: the model's router losses of this forward, then the registered terms."""
        terms = dict(model.aux_losses())
        for name, fn in AUX_TERMS.items():
            terms[name] = fn(model, preds)
        return terms

    def __call__(self, model: nn.Module, preds: Mapping[str, torch.Tensor], targets: Mapping, masks: Mapping
                 ) -> Loss:
        """`model` is the unwrapped model that ran the forward (its routers hold this forward's routing)."""
        losses = self.task_losses(preds, targets, masks)
        total, weights = self.weighting(losses)
        terms = {f"loss/{t}": v for t, v in losses.items()}
        for name, value in self.aux_losses(model, preds).items():
            terms[f"aux/{name}"] = value
            if self.aux_weights.get(name, 0.0):
                total = total + self.aux_weights[name] * value
        terms["loss"] = total
        if self.clamp is not None:  # the official recipe's guard: no gradient past +-clamp
            total = total.clamp(-self.clamp, self.clamp)
        return Loss(total, terms, weights)


def aux_weights(cfg: DictConfig) -> dict[str, float]:
    """{name: weight} of every numeric `aux.*` key (aux.task_prior is an option of the MI loss, not a weight)."""
    return {k: float(v) for k, v in cfg.aux.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_objective(cfg: DictConfig, tasks: list[str], device: torch.device) -> Objective:
    """The objective of `cfg` for `tasks` (train.weighting, train.task_losses, aux.*, train.loss_clamp)."""
    kwargs = OmegaConf.to_container(cfg.train.weighting_kwargs, resolve=True)
    try:
        weighting = build_weighting(cfg.train.weighting, tasks, **kwargs).to(device)
    except TypeError as e:
        raise ConfigError(f"train.weighting_kwargs {kwargs}: not options of weighting "
                          f"{cfg.train.weighting!r} ({e})") from None
    return Objective(tasks, weighting, aux_weights(cfg), dict(cfg.train.task_losses), cfg.train.loss_clamp)


def non_finite_terms(terms: Mapping[str, torch.Tensor], ctx: DistContext) -> list[str]:
    """Names of the terms that are NaN/inf on any rank ("loss" only when no single term is); collective."""
    bad = torch.stack([~torch.isfinite(v.detach().float()) for v in terms.values()]).float()
    bad = all_reduce_sum(bad, ctx)
    if not bad.any():
        return []
    return [k for k, b in zip(terms, bad.tolist(), strict=True) if b and k != "loss"] or [
        "loss (the weighted total: every term is finite, so the loss weighting overflowed; lower train.lr or "
        "check train.weighting)"]


__all__ = ["AUX_TERMS", "Loss", "Objective", "aux_term", "aux_weights", "build_objective", "non_finite_terms"]
