"""Which experts a task keeps, and the single-task model made of only those experts.

Mod-Squad's point is that a multi-task MoE model holds a small model per task: the experts a task's router
actually picks. Given expert usage counts (`modsquad.extract.usage`), `select_experts` picks per task and MoE
layer the experts to keep, and `extract_task_model` builds a `MultiTaskViT` for that task alone whose MoE layers hold
only those experts, with the task's router rows, task embedding and head:

    kept = select_experts(counts, top_ks, threshold=0.0)             # {layer: [expert ids]}
    task_model = extract_task_model(model, "depth_euclidean", kept)  # MultiTaskViT(tasks=[task]), eval mode

Routers pick the top-k of their logits. With `gate_values="renormalized"` they weigh the chosen experts by a
softmax over the chosen logits only, so the extracted router keeps only the kept experts' gate rows. With
`gate_values="topk_probs"` (the official Mod-Squad gates: raw softmax + 1e-4 of the chosen experts) the weights
depend on the softmax denominator over every expert, so the extracted router keeps all of the task's gate rows
(they are tiny) but the layer only the kept experts' weights (`attn_kept_experts` / `mlp_kept_experts` in the
config); when a dropped expert would win the top-k, the token falls back to the best kept experts. Either way,
when every expert a token chose is kept, the token chooses the same experts with the same weights in the
extracted model and its output is unchanged. Slicing is each layer's and router's own (`MoELayer.slice`,
`Router.slice`). Routers with `fixed_routing` (`task_level`) decide once per task; their layers are folded into
dense layers afterwards (`modsquad.extract.extracted.fold_moe_layers`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from ..models import build_model_from_config
from ..moe import MoELayer, experts_for_mass, experts_over_threshold

#: Mod-Squad's pruning rule (main_pruning.py / models_mt.py `pruning`): keep an expert if its usage share in
#: percent exceeds thresh / k, with thresh = 3 (0.5 % for 15-expert top-6 MoA, 0.75 % for 16-expert top-4 MLPs)
PAPER_THRESH = 3.0
#: `threshold=PAPER` anywhere a usage threshold is taken selects with `paper_threshold(top_k)` per layer
PAPER = "paper"


def paper_threshold(top_k: int, thresh: float = PAPER_THRESH) -> float:
    """Usage-share threshold (a fraction) of the official pruning rule for a layer with `top_k`: thresh / k %."""
    return thresh / top_k / 100.0


def check_selection(threshold: float | str | None = None, mass: float | None = None) -> None:
    """ConfigError unless `threshold` in [0, 1) (or `PAPER`) or `mass` in (0, 1] (at most one of them)."""
    if threshold is not None and mass is not None:
        raise ConfigError("give either a usage threshold (or the paper threshold) or a routing mass, not both")
    if threshold == PAPER:
        return
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold < 1.0):
        raise ConfigError(f"threshold must be in [0, 1), got {threshold}")
    if mass is not None and not (isinstance(mass, (int, float)) and 0.0 < mass <= 1.0):
        raise ConfigError(f"mass must be in (0, 1], got {mass}")


def select_layer_experts(counts: Sequence[int] | torch.Tensor, top_k: int, threshold: float | None = None,
                         mass: float | None = None) -> list[int]:
    """Experts one task keeps in one layer, as sorted ids; never fewer than `top_k`.

    counts: [E] top-k selections of the task per expert. Default (`threshold=None`, `mass=None`) keeps every
    expert the task selected at least once, which is `threshold=0`: experts whose usage share exceeds the
    threshold (`PAPER`: the official 3 / top_k %, see `paper_threshold`). `mass` keeps the fewest most-used
    experts that carry that share of the selections. If a task
    used fewer than `top_k` experts (or none), the most used ones (then the lowest ids) fill up to `top_k`.
    """
    check_selection(threshold, mass)
    counts = torch.as_tensor(counts)
    if threshold == PAPER:
        threshold = paper_threshold(top_k)
    if mass is not None:
        kept = experts_for_mass(counts, mass, min_keep=top_k)
    else:
        # experts_over_threshold keeps share >= t; the next float above t makes that "share > t"
        kept = experts_over_threshold(counts, math.nextafter(threshold or 0.0, math.inf), min_keep=top_k)
    return kept.tolist()


def select_experts(counts: Mapping[str, Sequence[int]], top_k: Mapping[str, int], threshold: float | None = None,
                   mass: float | None = None, paper: bool = False) -> dict[str, list[int]]:
    """Kept experts of one task in every MoE layer: {layer name: sorted ids} (see `select_layer_experts`).

    counts: {layer name: [E] selections (or an EMA of them) of the task}; top_k: {layer name: the layer's top-k}.
    `paper=True` applies the official rule per layer: usage share > `paper_threshold(top_k)` (3 / k %), at least
    top-k experts; it cannot be combined with `threshold` or `mass`.
    """
    if paper:
        if threshold is not None or mass is not None:
            raise ConfigError("the paper threshold (3/k %) cannot be combined with a threshold or a routing mass")
        threshold = PAPER
    return {name: select_layer_experts(counts[name], top_k[name], threshold, mass) for name in top_k}


# --- slicing ------------------------------------------------------------------------------------------------

def _sliced_layers(model: nn.Module, task: int, kept: Mapping[str, Sequence[int]]) -> dict[str, MoELayer]:
    layers = model.moe_layers()
    missing = [name for name, _ in layers if name not in kept]
    if missing:
        raise ValueError(f"no kept experts given for MoE layer(s) {missing}")
    return {name: layer.slice(task, kept[name]) for name, layer in layers}


def _config_for(model: nn.Module, task: str, sliced: Mapping[str, MoELayer]) -> dict:
    """`model.config` for one task whose MoE layers are `sliced`: per layer kind, `<kind>_experts` (gate rows)
    and `<kind>_kept_experts` (kept experts' gate rows, or null when a layer's router keeps only theirs)."""
    config = dict(model.config)
    config["tasks"] = [task]
    kinds = dict.fromkeys(layer.kind for layer in sliced.values())
    for kind in kinds:
        of_kind = [layer for layer in sliced.values() if layer.kind == kind]
        config[f"{kind}_experts"] = [layer.router.num_gate_rows for layer in of_kind]
        rows = [None if layer.router.kept_experts is None else layer.router.kept_experts.tolist() for layer in of_kind]
        config[f"{kind}_kept_experts"] = rows if any(r is not None for r in rows) else None
    return config


def extract_task_model(model: nn.Module, task: str, kept: Mapping[str, Sequence[int]]) -> nn.Module:
    """A `MultiTaskViT` for `task` alone with the experts `kept[layer]` (sorted ids) of every MoE layer.

    Built from the model's own config (so the same class and layers), then loaded with: the sliced MoE layers,
    the task's row of the task embedding, the task's head and every shared weight unchanged. Returned in eval
    mode on the model's device.
    """
    t = model.task_index(task)
    sliced = _sliced_layers(model, t, kept)
    task_model = build_model_from_config(_config_for(model, task, sliced))
    source = model.state_dict()
    state = {}
    for name in task_model.state_dict():
        if name.startswith("heads."):
            continue
        if name == "task_embed":
            state[name] = source[name][t:t + 1]
        elif name in source:
            state[name] = source[name]
    for name, layer in sliced.items():
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    state.update({f"heads.{task}.{k}": v for k, v in model.heads[task].state_dict().items()})
    task_model.load_state_dict(state, strict=True)
    device = next(model.parameters()).device
    return task_model.to(device).eval()


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers such as usage counts are not parameters)."""
    return sum(p.numel() for p in module.parameters())
