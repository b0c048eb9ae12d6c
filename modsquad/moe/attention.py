"""MoE attention (Mod-Squad's MoA): attention experts whose top-k choices act as a token's k heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import gather_tokens, grouped_matmul, plan_dispatch, sort_rows, sum_by_token, unsort_rows
from .experts import stacked_columns
from .layer import MoELayer
from .routers import token_task_ids

MOA_BIAS = ("official", "qo_bias")


class FoldedMoEAttention(nn.Module):
    """MoE attention with fixed experts and weights: multi-query attention, k heads sharing keys/values.

    q: Linear(dim, k * head_dim) holds the k experts' query projections; kv: the layer's shared Linear(dim,
    2 * head_dim); proj: Linear(k * head_dim, dim) holds the experts' output projections, each scaled by its gate
    weight, and the layer's output bias. x: [B, N, D] -> [B, N, D]; the task ids are ignored. Biases follow the
    layer's (`moa_bias`): the official layout has only a kv bias, "qo_bias" has all three.
    """

    folded_moe_layer = True  # `dispatch_paths` reports it as "folded"

    def __init__(self, dim: int, head_dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., kv_bias: bool | None = None, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * head_dim, bias=qkv_bias if kv_bias is None else kv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        k, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, k, hd).transpose(1, 2)  # [B, k, N, hd]
        key, value = self.kv(x).view(B, 1, N, 2, hd).unbind(3)  # [B, 1, N, hd]
        # expanded views of the one key/value head rather than enable_gqa, which the ONNX exporter lacks
        o = F.scaled_dot_product_attention(q, key.expand(-1, k, -1, -1), value.expand(-1, k, -1, -1),
                                           dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, k * hd)))


class MoEAttention(MoELayer):
    """Mixture of attention heads (MoA, Zhang et al.; Mod-Squad).

    Each expert e owns a query projection `q_weight[e]: [dim, head_dim]` (+ `q_bias[e]`) and an output
    projection `o_weight[e]: [head_dim, dim]`; one key/value projection `kv = Linear(dim, 2 * head_dim)` is
    shared by all experts. The k experts chosen for token t are its k heads:
        q_i = x_t W_q[e_i],  o_i = softmax(q_i K^T / sqrt(head_dim)) V  (K, V of all tokens of t's sample),
        out_t = sum_i w_i o_i W_o[e_i] + o_bias.
    The k slots run as k heads of one `scaled_dot_product_attention` call sharing K/V.
    Biases (`bias`, `MOA_BIAS`): "official" as the official Mod-Squad code (q and o without bias, kv with bias,
    no output bias); "qo_bias" adds a per-expert `q_bias` and a shared `o_bias: [dim]`, and `qkv_bias` decides
    the q and kv biases.
    """

    kind = "attn"

    def __init__(self, dim: int, head_dim: int, num_experts: int, top_k: int, num_tasks: int,
                 router: str = "per_task", qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 router_kwargs: dict | None = None, bias: str = "qo_bias", gate_values: str = "renormalized",
                 kept_experts: list[int] | None = None):
        super().__init__(dim, num_experts, top_k, num_tasks, router, router_kwargs, gate_values, kept_experts)
        if bias not in MOA_BIAS:
            raise ValueError(f"MoE attention bias must be one of {MOA_BIAS}, got {bias!r}")
        num_experts = self.num_experts
        official = bias == "official"
        self.dim = dim
        self.head_dim = head_dim
        self.bias = bias
        self.q_weight = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        self.q_bias = nn.Parameter(torch.empty(num_experts, head_dim)) if qkv_bias and not official else None
        self.kv = nn.Linear(dim, 2 * head_dim, bias=qkv_bias or official)
        self.o_weight = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        self.o_bias = None if official else nn.Parameter(torch.empty(dim))
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm ViT init: trunc_normal_(std=.02) weights, zero biases."""
        for w in (self.q_weight, self.kv.weight, self.o_weight):
            nn.init.trunc_normal_(w, std=0.02)
        for b in (self.q_bias, self.kv.bias, self.o_bias):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """x: [B, N, D]; task_ids: [B] per sample (or [B, N] per token, or an int) -> [B, N, D]."""
        if x.dim() != 3:
            raise ValueError(f"MoEAttention expects x of shape [B, N, D], got {tuple(x.shape)}")
        return super().forward(x, task_ids)

    def forward_sorted(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Each token's top-k experts as its k query heads over the shared keys/values. x: [B, N, D]."""
        B, N, D = x.shape
        k, hd = self.top_k, self.head_dim
        xt = x.reshape(B * N, D)
        routing = self.route(xt, token_task_ids(task_ids, (B, N), x.device))
        plan = plan_dispatch(routing.indices, self.num_experts)

        q = grouped_matmul(gather_tokens(xt, plan), self.q_weight, plan, self.q_bias)  # [S, hd]
        q = unsort_rows(q, plan).view(B, N, k, hd).transpose(1, 2)  # [B, k, N, hd]
        key, value = self.kv(x).view(B, 1, N, 2, hd).unbind(3)  # [B, 1, N, hd] each, shared by the k heads
        o = F.scaled_dot_product_attention(q, key, value, dropout_p=self.attn_drop if self.training else 0.,
                                           enable_gqa=True)
        # (token, slot) order, each head output scaled by its gate weight here, on hd columns rather than D
        o = o.transpose(1, 2).reshape(B * N * k, hd) * routing.weights.reshape(-1, 1).to(o.dtype)

        out = sum_by_token(grouped_matmul(sort_rows(o, plan), self.o_weight, plan), plan)  # [T, D]
        if self.o_bias is not None:
            out = out + self.o_bias.to(out.dtype)  # keeps autocast's bf16 (a Linear's bias would too)
        return self.proj_drop(out).view(B, N, D)

    def forward_all_experts(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Same result as `forward` with static shapes: every expert is a head of every token, weighted by the
        gates (0 for experts a token did not choose). x: [B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        E, hd = self.num_experts, self.head_dim
        xt = x.reshape(B * N, D)
        gates = self.dense_gates(self.route(xt, token_task_ids(task_ids, (B, N), x.device)), x.dtype)
        q = torch.matmul(xt, self.q_weight)  # [E, T, hd]
        if self.q_bias is not None:
            q = q + self.q_bias.unsqueeze(1)
        q = q.view(E, B, N, hd).transpose(0, 1)  # [B, E, N, hd]
        key, value = self.kv(x).view(B, 1, N, 2, hd).expand(B, E, N, 2, hd).unbind(3)
        o = F.scaled_dot_product_attention(q, key, value, dropout_p=self.attn_drop if self.training else 0.)
        y = torch.matmul(o.transpose(0, 1).reshape(E, B * N, hd), self.o_weight)  # [E, T, D]
        out = (gates.t().unsqueeze(-1) * y).sum(0)
        if self.o_bias is not None:
            out = out + self.o_bias.to(out.dtype)
        return self.proj_drop(out).view(B, N, D)

    def forward_stacked(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Every expert as a head of every token, with the queries of all E experts as one matmul ([D, E*hd]),
        one attention call of E heads sharing K/V, each head's output scaled by its gate (0 where not chosen) and
        one output matmul over the stacked o projections ([E*hd, D]). x: [B, N, D] -> [B, N, D]; equals `forward`
        to float rounding, at E / k times its expert FLOPs but without sorting and scattering rows."""
        B, N, D = x.shape
        num, hd = self.num_experts, self.head_dim
        xt = x.reshape(B * N, D)
        gates = self.dense_gates(self.route(xt, token_task_ids(task_ids, (B, N), x.device)), x.dtype)  # [T, E]
        q = xt @ stacked_columns(self, "q_weight", self.q_weight)  # [T, E*hd]
        if self.q_bias is not None:
            q = q + self.q_bias.reshape(num * hd).to(q.dtype)
        q = q.view(B, N, num, hd).transpose(1, 2)  # [B, E, N, hd]
        key, value = self.kv(x).view(B, 1, N, 2, hd).unbind(3)  # [B, 1, N, hd] each, shared by the E heads
        o = F.scaled_dot_product_attention(q, key, value, dropout_p=self.attn_drop if self.training else 0.,
                                           enable_gqa=True)
        o = o.transpose(1, 2).reshape(B * N, num, hd) * gates.unsqueeze(-1).to(o.dtype)
        out = o.reshape(B * N, num * hd) @ self.o_weight.reshape(num * hd, D)  # a view of o_weight
        if self.o_bias is not None:
            out = out + self.o_bias.to(out.dtype)
        return self.proj_drop(out).view(B, N, D)

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        own = {"q_weight": self.q_weight, "q_bias": self.q_bias, "o_weight": self.o_weight}
        return {name: p for name, p in own.items() if p is not None}

    @torch.no_grad()
    def fold_experts(self, indices: torch.Tensor, weights: torch.Tensor) -> FoldedMoEAttention:
        """A `FoldedMoEAttention` with the k experts as its heads, output projections scaled by their weights."""
        k, hd, d = len(indices), self.head_dim, self.dim
        folded = FoldedMoEAttention(d, hd, k, qkv_bias=self.q_bias is not None, attn_drop=self.attn_drop,
                                    proj_drop=self.proj_drop.p, kv_bias=self.kv.bias is not None,
                                    proj_bias=self.o_bias is not None).to(self.q_weight.device)
        folded.to(self.q_weight.dtype)
        w = weights.to(self.o_weight.dtype)
        folded.q.weight.copy_(self.q_weight[indices].transpose(1, 2).reshape(k * hd, d))
        if self.q_bias is not None:
            folded.q.bias.copy_(self.q_bias[indices].reshape(k * hd))
        folded.kv.load_state_dict(self.kv.state_dict())
        folded.proj.weight.copy_((self.o_weight[indices] * w[:, None, None]).reshape(k * hd, d).t())
        if self.o_bias is not None:
            folded.proj.bias.copy_(self.o_bias)
        return folded

    @torch.no_grad()
    def upcycle(self, dense: nn.Module) -> None:
        """Expert e <- query units / output columns [e*hd, (e+1)*hd) (mod dim) of a dense timm `Attention`
        (`qkv`, `proj`), output scaled by dim / hd; the shared key/value projection takes the first group's."""
        qkv, proj = dense.qkv, dense.proj
        dim, hd = self.dim, self.head_dim
        q_w, k_w, v_w = qkv.weight.chunk(3, dim=0)  # [dim, dim] each, rows = output units (head-major)
        q_b, k_b, v_b = qkv.bias.chunk(3) if qkv.bias is not None else (None, None, None)
        for e in range(self.num_experts):
            idx = (e * hd + torch.arange(hd)) % dim
            self.q_weight[e].copy_(q_w[idx].t())
            self.o_weight[e].copy_(proj.weight[:, idx].t() * (dim / hd))
            if self.q_bias is not None and q_b is not None:
                self.q_bias[e].copy_(q_b[idx])
        first = torch.arange(hd) % dim
        self.kv.weight.copy_(torch.cat([k_w[first], v_w[first]]))
        if self.kv.bias is not None and k_b is not None:
            self.kv.bias.copy_(torch.cat([k_b[first], v_b[first]]))
        if proj.bias is not None and self.o_bias is not None:  # the official MoA layout has no output bias
            self.o_bias.copy_(proj.bias)
