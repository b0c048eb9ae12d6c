"""Auxiliary router losses: task-expert mutual information (Mod-Squad), Switch load balance, router z-loss."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

TASK_PRIORS = ("uniform", "tokens", "official")
MI_REDUCE = ("mean", "sum")
OFFICIAL_MI_EPS = 1e-4


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mutual_information(probs: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, task_prior: str = "uniform",
                       eps: float = 1e-9) -> torch.Tensor:
    """Mutual information I(task; expert) of the joint P(t, e) built from router probabilities.

    probs: [T, E] full softmax per token, task_ids: [T] -> scalar (nats, in [0, log min(#tasks, E)]).
    P(e | t) = mean of probs over task t's tokens; P(t) = uniform over the tasks present (`task_prior="uniform"`)
    or their share of tokens (`"tokens"`); P(t, e) = P(t) P(e | t);
    MI = sum_{t,e} P(t, e) log(P(t, e) / (P(t) P(e))) = sum_{t,e} P(t, e) log(P(e | t) / P(e)).
    Maximising it makes each task use few experts (sharp P(e|t)) while all experts get used (flat P(e)).
    `"official"`: the official Mod-Squad formula, P(t, e) = sum of probs over task t's tokens / (all tokens +
    1e-4), P(t) = sum_e P(t, e) + 1e-4, P(e) = sum_t P(t, e) + 1e-4, MI = sum P(t, e) log(P(t, e) / P(t) / P(e)
    + 1e-4) (token-share prior; the 1e-4s make it differ slightly from "tokens").
    """
    if task_prior not in TASK_PRIORS:
        raise ValueError(f"task_prior must be one of {TASK_PRIORS}, got {task_prior!r}")
    probs = _float(probs)
    one_hot = F.one_hot(task_ids.reshape(-1), num_tasks).to(probs.dtype)  # [T, tasks]; matmul, no atomics
    if task_prior == "official":
        p_te = (one_hot.t() @ probs) / (probs.shape[0] + OFFICIAL_MI_EPS)  # [tasks, E]
        p_t = p_te.sum(1, keepdim=True) + OFFICIAL_MI_EPS
        p_e = p_te.sum(0, keepdim=True) + OFFICIAL_MI_EPS
        return (p_te * (p_te / p_t / p_e + OFFICIAL_MI_EPS).log()).sum()
    tokens = one_hot.sum(0)  # [tasks]
    p_e_given_t = (one_hot.t() @ probs) / tokens.clamp_min(1).unsqueeze(1)  # [tasks, E]
    if task_prior == "uniform":
        present = (tokens > 0).to(probs.dtype)
        p_t = present / present.sum().clamp_min(1)
    else:
        p_t = tokens / tokens.sum().clamp_min(1)
    p_te = p_t.unsqueeze(1) * p_e_given_t
    p_e = p_te.sum(0, keepdim=True)
    return (p_te * ((p_e_given_t + eps).log() - (p_e + eps).log())).sum()


def mi_loss(probs: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, task_prior: str = "uniform") -> torch.Tensor:
    """Loss to minimise: -mutual_information(...)."""
    return -mutual_information(probs, task_ids, num_tasks, task_prior)


def switch_balance_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer load balance E * sum_e f_e * P_e (1 at perfect balance, E when all go to one expert).

    probs: [T, E], indices: [T, k]. f_e = share of the T * k top-k assignments sent to e (no gradient),
    P_e = mean router probability of e.
    """
    probs = _float(probs)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=probs.dtype, device=probs.device))
    f = counts / max(indices.numel(), 1)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, keeps router logits small. logits: [T, E]."""
    return _float(logits).logsumexp(dim=-1).square().mean()


def _moe_layers(layers) -> list[nn.Module]:
    if isinstance(layers, nn.Module) and not hasattr(layers, "last_routing"):
        layers = layers.modules()
    return [m for m in layers if getattr(m, "last_routing", None) is not None]


def moe_aux_losses(layers: Iterable[nn.Module] | nn.Module, mi: bool = True, balance: bool = True, z: bool = True,
                   task_prior: str = "uniform", mi_reduce: str = "mean") -> dict[str, torch.Tensor]:
    """Aux losses from each MoE layer's last forward, averaged over layers (the MI loss summed over layers with
    `mi_reduce="sum"`, as the official Mod-Squad code does).

    layers: MoE layers (anything with `last_routing = (RouterOutput, task_ids)`), or a model to search.
    Returns the enabled ones of {"mi": -MI, "balance": switch loss, "z": z-loss}; zeros when no layer has routed.
    """
    if mi_reduce not in MI_REDUCE:
        raise ValueError(f"mi_reduce must be one of {MI_REDUCE}, got {mi_reduce!r}")
    routed = _moe_layers(layers)
    terms: dict[str, list[torch.Tensor]] = {name: [] for name, on in (("mi", mi), ("balance", balance), ("z", z)) if on}
    for layer in routed:
        routing, task_ids = layer.last_routing
        if mi:
            terms["mi"].append(mi_loss(routing.probs, task_ids, layer.num_tasks, task_prior))
        if balance:
            terms["balance"].append(switch_balance_loss(routing.probs, routing.indices, layer.num_experts))
        if z:
            terms["z"].append(router_z_loss(routing.logits))
    device = routed[0].last_routing[0].probs.device if routed else None
    reduce = {name: "mean" for name in terms} | ({"mi": mi_reduce} if mi else {})
    return {name: (torch.stack(v).sum() if reduce[name] == "sum" else torch.stack(v).mean()) if v
            else torch.zeros((), device=device) for name, v in terms.items()}
