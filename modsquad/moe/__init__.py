"""Mixture-of-experts core: routers, token dispatch, grouped experts, MoE MLP and attention, aux losses, usage.

Layers are plain tensors in, tensors out: `MoEMlp(x [B, N, D], task_ids [B]) -> [B, N, D]`, same for
`MoEAttention`. Aux losses read each layer's last routing (`moe_aux_losses`); usage counts live in each layer's
`usage` buffer [num_tasks, E].
"""

from .attention import MOA_BIAS, MoEAttention
from .dispatch import (
    DispatchPlan,
    combine,
    gather_tokens,
    grouped_matmul,
    grouped_mm_supported,
    plan_dispatch,
    sort_rows,
    unsort_rows,
)
from .experts import GroupedLinear
from .losses import mi_loss, moe_aux_losses, mutual_information, router_z_loss, switch_balance_loss
from .mlp import MoEMlp
from .routers import (
    GATE_VALUES,
    PROB_EPS,
    ROUTERS,
    MoELayer,
    PerTaskRouter,
    Router,
    RouterOutput,
    SharedRouter,
    TaskConditionedRouter,
    TaskLevelRouter,
    build_router,
    is_exporting,
    route_top_k,
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
    "GATE_VALUES", "MOA_BIAS", "PROB_EPS", "ROUTERS", "DispatchPlan", "GroupedLinear", "MoEAttention", "MoELayer", "MoEMlp", "PerTaskRouter", "Router",
    "RouterOutput", "SharedRouter", "TaskConditionedRouter", "TaskLevelRouter", "build_router", "combine",
    "count_selections", "experts_for_mass", "experts_for_mass_count", "experts_over_threshold", "gather_tokens",
    "grouped_matmul", "grouped_mm_supported", "is_exporting", "mi_loss", "moe_aux_losses", "mutual_information", "plan_dispatch",
    "route_top_k", "router_z_loss", "sort_rows", "switch_balance_loss", "token_task_ids", "unsort_rows",
    "usage_share",
]
