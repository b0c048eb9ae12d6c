"""AdamW with the usual ViT parameter groups and a per-step warm-up + cosine learning-rate schedule.

Mod-Squad trains with AdamW (weight decay 0.05), lr = 4e-4 x batch / 256, linear warm-up then cosine decay.
Weight decay is not applied to 1-D parameters (norm scales, biases, gate noise scales), to biases of any shape
(expert biases are [E, out]) nor to the names a model lists in `no_weight_decay()` (pos-embed, task embedding),
following timm's `param_groups_weight_decay`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Split trainable parameters into a decayed and an undecayed AdamW group.

    A parameter is not decayed when it is 1-D or a bias, or when its name (or a prefix of it ending at a dot) is in
    `skip` (timm's `no_weight_decay()` convention: `{"pos_embed", "task_embed"}`).
    """
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefixes = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or prefixes & skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    extra: Iterable[nn.Parameter] = (), betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `model` (decay groups from `param_groups`) plus undecayed `extra` params (loss weights).

    `model.no_weight_decay()` is used when the model defines it; the param order is deterministic so that an
    optimizer state saved by one run loads into the optimizer of the next (resume).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups(model, weight_decay, skip)
    extra = [p for p in extra if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """lr multiplier at optimizer step `step`: linear warm-up to 1, then cosine decay to `min_ratio`.

    Warm-up starts at 1 / warmup_steps (not 0) so that the first step already learns.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step `warmup_cosine` schedule; `min_lr` is absolute (relative to the first group's lr).

    The schedule's settings are not part of the scheduler's state_dict (a `partial` stores none), so a
    resumed run that raises train.steps follows its new schedule from the step it resumes at.
    """
    base_lr = optimizer.param_groups[0]["lr"]
    min_ratio = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    schedule = partial(warmup_cosine, total_steps=total_steps, warmup_steps=min(warmup_steps, total_steps),
                       min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
