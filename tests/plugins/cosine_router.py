"""A router defined outside the package, as a user would add one: cosine routing against per-task prototypes.

Importing this file registers it as "plugin_cosine"; the model option `router: plugin_cosine` then trains,
counts usage, extracts, adds tasks and benches with no change to modsquad. It is built to exercise every kind
of router state the interfaces know: a per-task tensor with one entry per expert (`prototypes`), a per-expert
tensor shared by all tasks (`expert_bias`) and a scalar shared by everything (`log_scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modsquad.moe import Router, register_router

NAME = "plugin_cosine"


@register_router(NAME)
class CosineRouter(Router):
    """logits[t] = exp(log_scale) * cos(x_t, prototypes[task_t, e]) + expert_bias[e] (X-MoE-style cosine gate).

    prototypes: [num_tasks, E, D] (trunc-normal, so tasks start out routing differently), expert_bias: [E],
    log_scale: [] (starts at log 10: cosines in [-1, 1] would give near-uniform softmaxes).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int, init_std: float = 0.02,
                 **routing):
        super().__init__(num_experts, top_k, num_tasks, **routing)
        self.prototypes = nn.Parameter(torch.empty(num_tasks, self.num_gate_rows, dim))
        nn.init.trunc_normal_(self.prototypes, std=init_std)
        self.expert_bias = nn.Parameter(torch.zeros(self.num_gate_rows))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def task_parameters(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes}

    def gate_row_dims(self) -> dict[str, int]:
        return {"prototypes": 1, "expert_bias": 0}

    def gate_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, D], task_ids: [T] -> logits [T, num_gate_rows]."""
        tasks, rows, dim = self.prototypes.shape
        protos = F.normalize(self.prototypes, dim=-1).reshape(tasks * rows, dim)
        cos = (F.normalize(x, dim=-1) @ protos.t().to(x.dtype)).view(-1, tasks, rows)
        cos = cos.gather(1, task_ids.reshape(-1, 1, 1).expand(-1, 1, rows)).squeeze(1)
        return cos * self.log_scale.exp() + self.expert_bias
