"""`MoELayer`: the base of every mixture-of-experts layer (MoE MLP, MoE attention, and any new kind).

A layer owns its router, keeps the last routing for the aux losses, counts expert usage, and describes itself
so that model surgery needs no per-class code:
    kind                  "attn" | "mlp": which model config fields describe it (`<kind>_experts`, ...)
    expert_parameters()   {name: tensor [E, ...]} stored expert-first: keeping experts is an index on dim 0
    task_parameters()     {name: tensor [num_tasks, ...]} (the router's, prefixed "router.")
    slice(task, experts)  a one-task layer with only `experts` (extraction)
    fold()                a dense module equal (in eval) to a one-task layer whose routing is fixed
    upcycle(dense)        copy the weights of the dense timm layer it replaces into the experts
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .rebuild import Rebuildable
from .routers import RouterOutput, build_router, is_exporting
from .usage import add_selections_

#: `dispatch_path` runs every expert densely ("stacked") when E <= STACKED_MAX_RATIO[kind] * top_k (other kinds:
#: E == k only). The stacked path costs E / k times the active expert FLOPs and saves the routing's sort, gathers
#: and scatters. Measured with `tools/bench_moe.py --stacked --top-k 4 --tokens 3152 --seq-len 197 --threads 1`
#: on this project's 2-core Xeon @ 2.80GHz (torch 2.14, fp32, no grad, medians of 7 interleaved runs, machine
#: shared with other jobs), stacked / sorted time at 197 tokens (one 224 px image) and 3152 tokens, D 384:
#:   MoE MLP (expert hidden 384): E/k 1.0: 0.83, 0.91; 1.25: 1.18, 0.93; 1.5: 1.03, 1.40; 2.0: 1.58, 1.74
#:   MoA (head_dim 128):          E/k 1.0: 0.73, 0.70; 1.25: 0.90, 0.90; 1.5: 0.95, 0.92; 2.0: 1.07, 1.40
#: In the whole extracted ViT-S (MoA 8 of 15 experts, top-6, E/k 1.33) a 1.5 limit measured slower at batch 1 in
#: two `tools/bench_model.py` runs (extracted / full 1.04x vs 0.92x), so the limits stay where every measurement
#: agreed: the MLP only at E == k, MoA up to 1.25.
STACKED_MAX_RATIO = {"mlp": 1.0, "attn": 1.25}


class MoELayer(Rebuildable):
    """Base of the MoE layers: owns the router, keeps the last routing for aux losses and counts usage.

    Subclasses implement `forward` (sorted dispatch, grouped matmuls) and `forward_all_experts` (every expert
    on every token, weighted by the dense gates: E / k times the compute, but static shapes, so that it can be
    traced and exported; `forward` switches to it while `is_exporting()`), optionally `forward_stacked` (the
    same maths as one concatenated matmul; `forward` takes it when E <= STACKED_MAX_RATIO[kind] * k), and declare
    `kind`, `expert_parameters()`, `fold_experts()` and `upcycle()`. Their constructors take `num_experts`,
    `num_tasks` and `kept_experts` by those names (`slice` rebuilds the layer with new ones).
    `last_routing` is `(RouterOutput, token task ids [T])` of the last forward (None before the first).
    `usage` is an int64 buffer [num_tasks, E] of top-k selections per task, summed over every forward (train
    and eval) while `track_usage` is True; it is saved in the state_dict and cleared by `reset_usage()`.
    int64 so that `model.to(dtype)` never rounds the counts.
    `gate_values` and `kept_experts` go to the router (`modsquad.moe.routers`): with `kept_experts`,
    `num_experts` is the number of gate rows and the layer holds `len(kept_experts)` experts.
    """

    kind: str = ""

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int, router: str = "per_task",
                 router_kwargs: dict | None = None, gate_values: str = "renormalized",
                 kept_experts: list[int] | None = None):
        super().__init__()
        self.router_kind = router
        self.router = build_router(router, dim, num_experts, top_k, num_tasks, gate_values=gate_values,
                                   kept_experts=kept_experts, **(router_kwargs or {}))
        self.register_buffer("usage", torch.zeros(num_tasks, self.router.num_experts, dtype=torch.long))
        self.track_usage = True
        self.last_routing: tuple[RouterOutput, torch.Tensor] | None = None
        self.last_path: str | None = None  # `dispatch_path()` of the last forward (reported by benchmarks)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def num_tasks(self) -> int:
        return self.router.num_tasks

    def route(self, x: torch.Tensor, task_ids: torch.Tensor) -> RouterOutput:
        """x: [T, D], task_ids: [T] -> RouterOutput; records it and counts the selections."""
        routing = self.router(x, task_ids)
        if is_exporting():
            return routing
        self.last_routing = (routing, task_ids)
        if self.track_usage:
            with torch.no_grad():
                add_selections_(self.usage, routing.indices, task_ids)
        return routing

    def reset_usage(self) -> None:
        self.usage.zero_()

    def runs_all_experts(self) -> bool:
        """Whether `forward` should take a static-shape path (every expert on every token): while exporting,
        and when the layer has few experts for its top-k (`dispatch_path`)."""
        return self.dispatch_path() != "sorted"

    def dispatch_path(self) -> str:
        """How `forward` runs: "all_experts" while exporting (`forward_all_experts`), "stacked" when
        E <= STACKED_MAX_RATIO * k (`forward_stacked`: the E experts as one concatenated matmul, gates applied
        on their hidden chunks; STACKED_MAX_RATIO per kind), else "sorted" (sort tokens by expert, grouped
        matmuls, scatter back)."""
        if is_exporting():
            return "all_experts"
        limit = STACKED_MAX_RATIO.get(self.kind, 1.0) * self.top_k
        return "stacked" if self.num_experts <= limit else "sorted"

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Run the layer on the path `dispatch_path()` picks (recorded in `last_path`); the paths agree to float
        rounding. x: [..., D] tokens, task_ids as `token_task_ids` accepts -> same shape as x."""
        path = self.dispatch_path()
        self.last_path = path
        if path == "stacked":
            return self.forward_stacked(x, task_ids)
        if path == "all_experts":
            return self.forward_all_experts(x, task_ids)
        return self.forward_sorted(x, task_ids)

    def forward_sorted(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """The general path: tokens sorted by expert, grouped matmuls, scattered back."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_sorted()")

    def forward_all_experts(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Every expert on every token, weighted by the dense gates: static shapes (export)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_all_experts()")

    def forward_stacked(self, x: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Same result as `forward` (to float rounding): every expert on every token as one matmul over the
        concatenated experts, weighted by the dense gates. Defaults to `forward_all_experts`."""
        return self.forward_all_experts(x, task_ids)

    @staticmethod
    def dense_gates(routing: RouterOutput, dtype: torch.dtype) -> torch.Tensor:
        """[T, E] gate weight of every expert for every token (0 where not chosen), for `forward_all_experts`."""
        gates = routing.probs.new_zeros(routing.probs.shape)
        return gates.scatter(1, routing.indices, routing.weights.to(gates.dtype)).to(dtype)

    # --- self-description -------------------------------------------------------------------------------

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """{name (relative to the layer): tensor [E, ...]} of the per-expert weights, expert on dim 0."""
        raise NotImplementedError(f"{type(self).__name__} must declare its expert_parameters()")

    def task_parameters(self) -> dict[str, torch.Tensor]:
        """{name (relative to the layer): tensor [num_tasks, ...]}: the router's task-indexed parameters."""
        return {f"router.{name}": p for name, p in self.router.task_parameters().items()}

    def slice(self, task: int, experts: Sequence[int]) -> MoELayer:
        """A one-task copy of this layer for task `task` with only `experts` (sorted expert ids).

        Expert weights are indexed on dim 0, everything else (shared projections, biases) is kept whole; the
        router is `router.slice(task, experts)` (which may keep more gate rows than experts, see there). The
        usage counts start at zero.
        """
        router = self.router.slice(task, experts)
        kept = None if router.kept_experts is None else router.kept_experts.tolist()
        new = self.rebuilt(num_tasks=1, num_experts=router.num_gate_rows, kept_experts=kept)
        idx = torch.as_tensor([int(e) for e in experts], dtype=torch.long, device=self.usage.device)
        by_expert = set(self.expert_parameters())
        state = {}
        for name, value in self.state_dict().items():
            if name.startswith("router.") or name == "usage":
                continue
            state[name] = value.index_select(0, idx) if name in by_expert else value
        state.update({f"router.{k}": v for k, v in router.state_dict().items()})
        state["usage"] = torch.zeros_like(new.usage)
        new.load_state_dict(state, strict=True)
        return new

    def fold(self) -> nn.Module:
        """A dense module equal (in eval) to this one-task layer, whose router has `fixed_routing`: every token
        goes through the same k experts with the same weights. It takes `(x, task_ids=None)` like the layer."""
        if not self.router.fixed_routing:
            raise ValueError(f"{type(self.router).__name__} routes per token: only fixed routing folds")
        if self.num_tasks != 1:
            raise ValueError("fold the layers of an extracted (one-task) model")
        indices, weights = self.router.fixed_choice(0)
        return self.fold_experts(indices, weights).train(self.training)

    def fold_experts(self, indices: torch.Tensor, weights: torch.Tensor) -> nn.Module:
        """The dense module of `fold` given the fixed experts `indices` [k] and their gate `weights` [k]."""
        raise NotImplementedError(f"{type(self).__name__} cannot fold")

    def upcycle(self, dense: nn.Module) -> None:
        """Initialise the experts in place from the dense timm layer this layer replaces (sparse upcycling)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be upcycled from a dense layer")


def dispatch_paths(module: nn.Module) -> dict[str, str]:
    """{module name: how it runs} for every MoE layer in `module`: its `dispatch_path()` ("sorted", "stacked",
    "all_experts"), or "folded" for the dense modules that `MoELayer.fold` returns (for benchmark reports)."""
    paths = {}
    for name, m in module.named_modules():
        if isinstance(m, MoELayer):
            paths[name] = m.dispatch_path()
        elif getattr(m, "folded_moe_layer", False):
            paths[name] = "folded"
    return paths
