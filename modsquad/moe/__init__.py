"""Mixture-of-experts core: routers, token dispatch, grouped experts, MoE MLP and attention, aux losses, usage.

Routers (`Router`, `@register_router`) and layers (`MoELayer`) describe themselves (task-indexed parameters,
expert parameters, slicing, growing, folding), so a new router or layer kind is one file.

Layers are plain tensors in, tensors out: `MoEMlp(x [B, N, D], task_ids [B]) -> [B, N, D]`, same for
`MoEAttention`. Aux losses read each layer's last routing (`moe_aux_losses`); usage counts live in each layer's
`usage` buffer [num_tasks, E].
"""

from .attention import MOA_BIAS, FoldedMoEAttention, MoEAttention
from .dispatch import (
    DispatchPlan,
    combine,
    gather_tokens,
    grouped_matmul,
    grouped_mm_supported,
    plan_dispatch,
    sort_rows,
    sum_by_token,
    unsort_rows,
)
from .experts import GroupedLinear
from .layer import MoELayer, dispatch_paths
from .losses import mi_loss, moe_aux_losses, mutual_information, router_z_loss, switch_balance_loss
from .mlp import FoldedMoEMlp, MoEMlp
from .routers import (
    GATE_VALUES,
    PROB_EPS,
    ROUTERS,
    PerTaskRouter,
    Router,
    RouterOutput,
    SharedRouter,
    TaskConditionedRouter,
    TaskLevelRouter,
    build_router,
    is_exporting,
    register_router,
    route_top_k,
    router_class,
    router_names,
    token_task_ids,
)
from .usage import (
    count_selections,
    experts_for_mass,
    experts_for_mass_count,
    experts_over_threshold,
    usage_share,
)

__all__ = [
    "GATE_VALUES", "MOA_BIAS", "PROB_EPS", "ROUTERS", "DispatchPlan", "FoldedMoEAttention", "FoldedMoEMlp",
    "GroupedLinear", "MoEAttention", "MoELayer", "MoEMlp", "PerTaskRouter", "Router", "RouterOutput",
    "SharedRouter", "TaskConditionedRouter", "TaskLevelRouter", "build_router", "combine", "count_selections",
    "dispatch_paths", "experts_for_mass", "experts_for_mass_count", "experts_over_threshold", "gather_tokens",
    "grouped_matmul", "grouped_mm_supported", "is_exporting", "mi_loss", "moe_aux_losses", "mutual_information", "plan_dispatch",
    "register_router", "route_top_k", "router_class", "router_names", "router_z_loss", "sort_rows",
    "sum_by_token", "switch_balance_loss", "token_task_ids", "unsort_rows", "usage_share",
]
