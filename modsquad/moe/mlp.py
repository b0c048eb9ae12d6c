"""MoE MLP: E two-layer MLP experts, each token runs through its top-k and sums them by gate weight."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from .dispatch import combine, gather_tokens, plan_dispatch
from .experts import GroupedLinear, stacked_columns
from .layer import MoELayer
from .routers import token_task_ids


class FoldedMoEMlp(Mlp):
    """timm `Mlp` with the MoE call signature (the task ids are ignored): the dense fold of an MoE MLP with
    fixed routing (`MoEMlp.fold`). Its weights have timm's names (fc1, fc2), as a dense MLP block's."""

    folded_moe_layer = True  # `dispatch_paths` reports it as "folded"

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class MoEMlp(MoELayer):
    """Mixture-of-experts replacement for timm's `Mlp` (fc1 -> act -> drop -> fc2 -> drop).

    Each expert is a 2-layer MLP with hidden `expert_hidden` (default `hidden_dim // top_k`, so a token's
    active compute equals the dense MLP's; the official Mod-Squad code uses int(dim * mlp_ratio) // top_k).
    out[t] = sum_i weights[t, i] * expert_{indices[t, i]}(x[t]), weights as the router's `gate_values`.
    Expert weights: `fc1.weight [E, dim, expert_hidden]`, `fc2.weight [E, expert_hidden, dim]` (+ biases).
    """

    kind = "mlp"

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

    def forward_sorted(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """x: [B, N, D] or [T, D]; task_ids: [B] per sample (or per token, or an int) -> same shape as x."""
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

    def forward_stacked(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """All E experts as one MLP of hidden E * expert_hidden: fc1 of the experts side by side ([D, E*h], one
        matmul), each expert's hidden chunk scaled by its gate (0 where not chosen), fc2 stacked ([E*h, D], one
        matmul), plus the gate-weighted fc2 biases. x: [B, N, D] or [T, D] -> same shape; equals `forward` to float
        rounding, at E / k times its expert FLOPs but without sorting and scattering rows."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates = self.dense_gates(self.route(x, token_task_ids(task_ids, shape[:-1], x.device)), x.dtype)  # [T, E]
        num, h = self.num_experts, self.expert_hidden
        hidden = x @ stacked_columns(self, "fc1", self.fc1.weight)  # [T, E*h]
        if self.fc1.bias is not None:
            hidden = hidden + self.fc1.bias.reshape(num * h).to(hidden.dtype)
        hidden = self.drop1(self.act(hidden)).view(-1, num, h) * gates.unsqueeze(-1).to(hidden.dtype)
        y = hidden.view(-1, num * h) @ self.fc2.weight.reshape(num * h, self.dim)  # [T, D], a view of fc2
        if self.fc2.bias is not None:
            y = y + gates.to(y.dtype) @ self.fc2.bias.to(y.dtype)
        return self.drop2(y).view(shape)

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        own = {"fc1.weight": self.fc1.weight, "fc1.bias": self.fc1.bias,
               "fc2.weight": self.fc2.weight, "fc2.bias": self.fc2.bias}
        return {name: p for name, p in own.items() if p is not None}

    @torch.no_grad()
    def fold_experts(self, indices: torch.Tensor, weights: torch.Tensor) -> FoldedMoEMlp:
        """A dense MLP of hidden k * expert_hidden: the k experts' hidden units side by side, each expert's
        output rows scaled by its weight (indices, weights: [k])."""
        k, h, d = len(indices), self.expert_hidden, self.dim
        dense = FoldedMoEMlp(d, k * h, act_layer=type(self.act), drop=self.drop1.p).to(self.fc1.weight.device)
        dense.to(self.fc1.weight.dtype)
        w = weights.to(self.fc2.weight.dtype)
        dense.fc1.weight.copy_(self.fc1.weight[indices].transpose(1, 2).reshape(k * h, d))  # [k, D, h] -> [k*h, D]
        dense.fc1.bias.copy_(self.fc1.bias[indices].reshape(k * h))
        dense.fc2.weight.copy_((self.fc2.weight[indices] * w[:, None, None]).reshape(k * h, d).t())
        dense.fc2.bias.copy_((self.fc2.bias[indices] * w[:, None]).sum(0))
        return dense

    @torch.no_grad()
    def upcycle(self, dense: nn.Module) -> None:
        """Expert e <- hidden units [e*h, (e+1)*h) (mod H) of a dense timm `Mlp` (`fc1`, `fc2`), fc2 scaled by
        H / h: with expert hidden H / top_k and uniform routing (weights 1/k over experts 0..k-1) the layer
        computes exactly the dense MLP."""
        fc1, fc2 = dense.fc1, dense.fc2
        hidden, h = fc1.out_features, self.expert_hidden
        for e in range(self.num_experts):
            idx = (e * h + torch.arange(h)) % hidden
            self.fc1.weight[e].copy_(fc1.weight[idx].t())
            self.fc2.weight[e].copy_(fc2.weight[:, idx].t() * (hidden / h))
            if self.fc1.bias is not None and fc1.bias is not None:
                self.fc1.bias[e].copy_(fc1.bias[idx])
            if self.fc2.bias is not None and fc2.bias is not None:
                self.fc2.bias[e].copy_(fc2.bias)
