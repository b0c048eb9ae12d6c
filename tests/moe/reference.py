"""Slow per-token reference of the MoE layers, written from the definitions, for tests only.

Every token is routed on its own (its gate logits, a Python top-k with ties to the lower id) and runs through
its experts one at a time, so nothing here shares code with the sort/grouped-matmul path under test. The
reference reads the layer's own parameters, so autograd gives comparable gradients.
"""

from __future__ import annotations

import math

import torch

from modsquad.moe import (
    GATE_VALUES,
    MOA_BIAS,
    PROB_EPS,
    MoEAttention,
    MoEMlp,
    PerTaskRouter,
    SharedRouter,
    TaskConditionedRouter,
    TaskLevelRouter,
)

NEVER_LOGIT = -100.0

# (router kind, router kwargs, stochastic in training): every router variant the layer tests run through
ROUTER_CONFIGS = [
    ("per_task", {}, False),
    ("per_task", {"noisy": True}, True),
    ("task_conditioned", {}, False),
    ("task_conditioned", {"task_dim": 6}, False),
    ("task_level", {}, False),
    ("task_level", {"mode": "gumbel"}, True),
    ("task_level", {"mode": "gumbel_st", "tau": 0.5}, True),
    ("shared", {}, False),
]
ROUTER_IDS = [kind + "".join(f"-{k}={v}" for k, v in kw.items()) for kind, kw, _ in ROUTER_CONFIGS]
# layer options the reference knows: gate values of the chosen experts, MoE attention biases
GATE_VALUE_OPTIONS = list(GATE_VALUES)
MOA_BIAS_OPTIONS = list(MOA_BIAS)


def token_logits(router, x_t: torch.Tensor, task: int) -> torch.Tensor:
    """Gate logits [E] of one token x_t: [D] of task `task` (noise-free, i.e. eval semantics)."""
    if isinstance(router, PerTaskRouter):
        return router.weight[task] @ x_t
    if isinstance(router, TaskConditionedRouter):
        return router.gate(torch.cat([x_t, router.task_embed[task]]))
    if isinstance(router, TaskLevelRouter):
        return router.task_logits[task].to(x_t.dtype)
    if isinstance(router, SharedRouter):
        return router.gate.weight @ x_t
    raise TypeError(type(router))


def token_route(router, x_t: torch.Tensor, task: int) -> tuple[list[int], list[torch.Tensor]]:
    """Chosen experts (best first, as ids of the layer's experts) and their weights for one token.

    The softmax runs over every gate row (+ PROB_EPS for raw top-k prob gates); with `kept_experts` the choice
    is among the kept rows only, and expert j of the layer is gate row kept_experts[j].
    """
    logits = token_logits(router, x_t, task)
    probs = torch.softmax(logits, dim=0)
    if router.gate_values == "topk_probs":
        probs = probs + PROB_EPS
    rows = list(range(len(logits))) if router.kept_experts is None else router.kept_experts.tolist()
    values = logits.tolist()
    chosen = sorted(range(len(rows)), key=lambda j: (-values[rows[j]], j))[: router.top_k]
    if isinstance(router, TaskLevelRouter) and router.mode == "gumbel_st":
        weights = [torch.ones((), dtype=x_t.dtype) / router.top_k] * router.top_k
    elif router.gate_values == "topk_probs":
        weights = [probs[rows[j]] for j in chosen]
    else:
        weights = list(torch.softmax(torch.stack([logits[rows[j]] for j in chosen]), dim=0))
    return chosen, weights


def _per_sample_tasks(task_ids, batch: int) -> list[int]:
    task_ids = torch.as_tensor(task_ids)
    return [int(task_ids)] * batch if task_ids.dim() == 0 else [int(t) for t in task_ids]


def reference_mlp(layer: MoEMlp, x: torch.Tensor, task_ids) -> torch.Tensor:
    """x: [B, N, D], task_ids: [B] -> [B, N, D], one token and one expert at a time."""
    tasks = _per_sample_tasks(task_ids, x.shape[0])
    rows = []
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            x_t = x[b, n]
            out = torch.zeros_like(x_t)
            for e, w in zip(*token_route(layer.router, x_t, tasks[b]), strict=True):
                h = layer.act(x_t @ layer.fc1.weight[e] + layer.fc1.bias[e])
                out = out + w * (h @ layer.fc2.weight[e] + layer.fc2.bias[e])
            rows.append(out)
    return torch.stack(rows).view_as(x)


def reference_attention(layer: MoEAttention, x: torch.Tensor, task_ids) -> torch.Tensor:
    """x: [B, N, D], task_ids: [B] -> [B, N, D]: each chosen expert is one head over its sample's tokens."""
    tasks = _per_sample_tasks(task_ids, x.shape[0])
    hd = layer.head_dim
    w_k, w_v = layer.kv.weight[:hd], layer.kv.weight[hd:]
    b_k, b_v = (layer.kv.bias[:hd], layer.kv.bias[hd:]) if layer.kv.bias is not None else (0.0, 0.0)
    rows = []
    for b in range(x.shape[0]):
        keys = x[b] @ w_k.t() + b_k  # [N, hd]
        values = x[b] @ w_v.t() + b_v
        for n in range(x.shape[1]):
            x_t = x[b, n]
            out = layer.o_bias.clone() if layer.o_bias is not None else torch.zeros_like(x_t)
            for e, w in zip(*token_route(layer.router, x_t, tasks[b]), strict=True):
                q = x_t @ layer.q_weight[e] + (layer.q_bias[e] if layer.q_bias is not None else 0.0)
                attn = torch.softmax(keys @ q / math.sqrt(hd), dim=0)  # [N]
                out = out + w * ((attn @ values) @ layer.o_weight[e])
            rows.append(out)
    return torch.stack(rows).view_as(x)


@torch.no_grad()
def randomize_router(router, generator: torch.Generator, never: int | None = None) -> None:
    """Give the router random (not zero) gates so routing varies by token; with `never`, expert `never` is
    never chosen, provided every token has x[..., 0] == 1 (the gate puts NEVER_LOGIT on that feature)."""
    for p in router.parameters():
        p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    if never is None:
        return
    if router.kept_experts is not None:  # `never` is an expert of the layer: its gate row is kept_experts[never]
        never = int(router.kept_experts[never])
    if isinstance(router, PerTaskRouter):
        router.weight[:, never] = 0.0
        router.weight[:, never, 0] = NEVER_LOGIT
    elif isinstance(router, TaskConditionedRouter):
        router.gate.weight[never] = 0.0
        router.gate.bias[never] = NEVER_LOGIT
    elif isinstance(router, TaskLevelRouter):
        router.task_logits[:, never] = NEVER_LOGIT
    elif isinstance(router, SharedRouter):
        router.gate.weight[never] = 0.0
        router.gate.weight[never, 0] = NEVER_LOGIT


@torch.no_grad()
def randomize_experts(layer, generator: torch.Generator, std: float = 0.5) -> None:
    """Replace the (tiny, timm-initialised) expert weights by O(1) random values so that experts differ clearly."""
    for name, p in layer.named_parameters():
        if not name.startswith("router."):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def outputs_and_grads(fn, x: torch.Tensor, params: list[torch.Tensor], grad_out: torch.Tensor):
    """fn(x) and the gradients of <fn(x), grad_out> w.r.t. x and params (zeros for unused params)."""
    x = x.detach().requires_grad_()
    out = fn(x)
    grads = torch.autograd.grad((out * grad_out).sum(), [x, *params], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *params], strict=True)]
    return out.detach(), grads


def assert_layer_matches(layer, reference_fn, x: torch.Tensor, task_ids, generator: torch.Generator,
                         atol: float = 1e-10, rtol: float = 1e-8) -> None:
    """Outputs and gradients (input and every parameter) of layer(x) equal those of the reference."""
    names, params = zip(*layer.named_parameters(), strict=True)
    grad_out = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    out, grads = outputs_and_grads(lambda t: layer(t, task_ids), x, list(params), grad_out)
    ref, ref_grads = outputs_and_grads(lambda t: reference_fn(layer, t, task_ids), x, list(params), grad_out)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, g, r in zip(("input", *names), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad of {name}: {m}")
