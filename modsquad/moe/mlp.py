"""MoE MLP: E two-layer MLP experts, each token runs through its top-k and sums them by gate weight."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import combine, gather_tokens, plan_dispatch
from .experts import GroupedLinear
from .routers import MoELayer, token_task_ids


class MoEMlp(MoELayer):
    """Mixture-of-experts replacement for timm's `Mlp` (fc1 -> act -> drop -> fc2 -> drop).

    Each expert is a 2-layer MLP with hidden `expert_hidden` (default `hidden_dim // top_k`, so a token's
    active compute equals the dense MLP's; the official Mod-Squad code uses int(dim * mlp_ratio) // top_k).
    out[t] = sum_i weights[t, i] * expert_{indices[t, i]}(x[t]), weights as the router's `gate_values`.
    Expert weights: `fc1.weight [E, dim, expert_hidden]`, `fc2.weight [E, expert_hidden, dim]` (+ biases).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, num_tasks: int,
                 router: str = "per_task", expert_hidden: int | None = None, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0., router_kwargs: dict | None = None, gate_values: str = "renormalized",
                 kept_experts: list[int] | None = None):
        super().__init__(dim, num_experts, top_k, num_tasks, router, router_kwargs, gate_values, kept_experts)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.expert_hidden = expert_hidden or max(1, hidden_dim // top_k)
        self.fc1 = GroupedLinear(self.num_experts, dim, self.expert_hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = GroupedLinear(self.num_experts, self.expert_hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """x: [B, N, D] or [T, D]; task_ids: [B] per sample (or per token, or an int) -> same shape as x."""
        if self.runs_all_experts():
            return self.forward_all_experts(x, task_ids)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.route(x, token_task_ids(task_ids, shape[:-1], x.device))
        plan = plan_dispatch(routing.indices, self.num_experts)
        h = self.fc1(gather_tokens(x, plan), plan)
        h = self.drop1(self.act(h))
        h = self.fc2(h, plan)
        return self.drop2(combine(h, routing.weights, plan)).view(shape)

    def forward_all_experts(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Same result as `forward` with static shapes: all E experts on all tokens, weighted by the gates."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates = self.dense_gates(self.route(x, token_task_ids(task_ids, shape[:-1], x.device)), x.dtype)
        h = torch.matmul(x, self.fc1.weight) + self.fc1.bias.unsqueeze(1)  # [E, T, expert_hidden]
        h = self.drop1(self.act(h))
        y = torch.matmul(h, self.fc2.weight) + self.fc2.bias.unsqueeze(1)  # [E, T, D]
        return self.drop2((gates.t().unsqueeze(-1) * y).sum(0)).view(shape)
