"""Named model presets (timm style) and the one place where configs become `MultiTaskViT` arguments.

    model = create_model("modsquad_vit_s", tasks=["depth_euclidean", "normal"], img_size=224, drop_path_rate=0.2)

Every model records its constructor arguments in `model.config` (plain JSON, with the preset `name`), and
`build_model_from_config(model.config)` rebuilds the same architecture, which is how checkpoints are loaded.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence

from ..core.errors import ConfigError, UnknownNameError
from .vit import MultiTaskViT

_model_entrypoints: dict[str, Callable[..., MultiTaskViT]] = {}

#: Keyword arguments a preset or config may set (everything MultiTaskViT takes).
MODEL_ARGS = tuple(p for p in inspect.signature(MultiTaskViT.__init__).parameters if p != "self")


def register_model(fn: Callable[..., MultiTaskViT]) -> Callable[..., MultiTaskViT]:
    """Decorator: register a preset under its function name."""
    _model_entrypoints[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted preset names, optionally filtered by a shell pattern such as "dense_*"."""
    return sorted(n for n in _model_entrypoints if fnmatch.fnmatch(n, pattern))


def _check_keys(kwargs: dict, where: str) -> None:
    unknown = [k for k in kwargs if k not in MODEL_ARGS]
    if unknown:
        raise ConfigError(f"{where}: unknown model option(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(MODEL_ARGS)}")


def create_model(name: str, tasks: Sequence[str], img_size: int | tuple[int, int] = 224,
                 **overrides) -> MultiTaskViT:
    """Build preset `name` for `tasks`; `overrides` replace preset values (any MultiTaskViT argument)."""
    if name not in _model_entrypoints:
        raise UnknownNameError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _model_entrypoints[name](tasks=tasks, img_size=img_size, **overrides)


def build_model_from_config(config: dict) -> MultiTaskViT:
    """Rebuild a model from its `model.config` (as stored in checkpoints), without going through the preset,
    so later changes to a preset never change a saved model's architecture."""
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    _check_keys(kwargs, "model config")
    if "tasks" not in kwargs:
        raise ConfigError("model config has no 'tasks'")
    model = MultiTaskViT(**kwargs)
    model.config["name"] = name
    return model


def _create(name: str, tasks: Sequence[str], img_size, preset: dict, overrides: dict) -> MultiTaskViT:
    _check_keys(overrides, f"model {name!r}")
    model = MultiTaskViT(tasks=list(tasks), img_size=img_size, **{**preset, **overrides})
    model.config["name"] = name
    return model


# --- presets ----------------------------------------------------------------------------------------------
# modsquad_vit_s / _b follow the official Mod-Squad code (UMass-Foundation-Model/Mod-Squad: models_mt.py,
# models_moe.py, parallel_linear/parallel_experts/moe.py; design.md "Paper settings"): MoA in even blocks (15 / 24
# experts, top-6 / top-12, head_dim 128, bias only on the shared kv projection) + dense MLP 4x; MoE MLP in odd
# blocks (16 experts, top-4, expert hidden int(dim * mlp_ratio) // 4) + dense attention with 6 / 12 heads of 128;
# per-task bias-free gates (trunc_normal 0.02, no noise), gate values = raw top-k of softmax + 1e-4; task embedding
# before every block; class token; classification pools un-normed patch tokens through `fc_norm`; inputs in
# [-1, 1]; MI loss summed over layers. With the 13 Taskonomy tasks: ViT-S 55,436,245 and ViT-B 206,956,117
# parameters (tests/models/test_official_param_count.py). The tiny preset keeps modsquad's own variants.

_TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
_S = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.1)
_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.1)

#: what the official code does where modsquad offers a choice (stem, routing, losses; not expert counts)
OFFICIAL = dict(gate_values="topk_probs", task_embed="every_block", mi_reduce="sum", moa_bias="official",
                input_norm="minus1_1", class_token=True, fc_norm=True, router_kwargs={"init_std": 0.02})
#: modsquad's own variants of the same choices (the MultiTaskViT defaults)
MODSQUAD_VARIANTS = dict(gate_values="renormalized", task_embed="input", mi_reduce="mean", moa_bias="qo_bias",
                         input_norm="imagenet", class_token=False, fc_norm=False, router_kwargs={},
                         dense_attn_head_dim=None)

_TINY_MOE = dict(router="per_task", moe_every=1, moe_layout="both", attn_experts=8, attn_top_k=2, attn_head_dim=32,
                 mlp_experts=8, mlp_top_k=2, mlp_expert_hidden=64)
_S_MOE = dict(router="per_task", moe_every=1, moe_layout="alternate", attn_experts=15, attn_top_k=6,
              attn_head_dim=128, mlp_experts=16, mlp_top_k=4, mlp_expert_hidden=384, dense_attn_head_dim=128,
              **OFFICIAL)
_B_MOE = dict(router="per_task", moe_every=1, moe_layout="alternate", attn_experts=24, attn_top_k=12,
              attn_head_dim=128, mlp_experts=16, mlp_top_k=4, mlp_expert_hidden=768, dense_attn_head_dim=128,
              **OFFICIAL)
# dense twins: a standard ViT (head_dim = dim / heads) with the official stem, inputs and heads
_DENSE = dict(router="dense", dense_attn_head_dim=None)


@register_model
def modsquad_vit_tiny(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Tiny Mod-Squad ViT for tests and the CPU demo: dim 64, 4 blocks, MoA + MoE MLP in every block."""
    return _create("modsquad_vit_tiny", tasks, img_size, {**_TINY, **_TINY_MOE}, overrides)


@register_model
def modsquad_vit_s(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Mod-Squad ViT-S/16 as the official code: MoA 15 experts top-6, MoE MLP 16 experts top-4, alternating blocks
    (see the preset notes above; `**MODSQUAD_VARIANTS` as overrides gives modsquad's own variants)."""
    return _create("modsquad_vit_s", tasks, img_size, {**_S, **_S_MOE}, overrides)


@register_model
def modsquad_vit_b(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Mod-Squad ViT-B/16 as the official code: MoA 24 experts top-12, MoE MLP 16 experts top-4, alternating
    blocks."""
    return _create("modsquad_vit_b", tasks, img_size, {**_B, **_B_MOE}, overrides)


@register_model
def dense_vit_tiny(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Dense twin of modsquad_vit_tiny: shared ViT encoder, one head per task."""
    return _create("dense_vit_tiny", tasks, img_size, {**_TINY, **_TINY_MOE, "router": "dense"}, overrides)


@register_model
def dense_vit_s(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Dense twin of modsquad_vit_s (the usual multi-task ViT-S baseline)."""
    return _create("dense_vit_s", tasks, img_size, {**_S, **_S_MOE, **_DENSE}, overrides)


@register_model
def dense_vit_b(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Dense twin of modsquad_vit_b."""
    return _create("dense_vit_b", tasks, img_size, {**_B, **_B_MOE, **_DENSE}, overrides)
