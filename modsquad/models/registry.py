"""Named model presets (timm style) and the one place where configs become `MultiTaskViT` arguments.

    model = create_model("modsquad_vit_s", tasks=["depth_euclidean", "normal"], img_size=224, drop_path_rate=0.2)

Every model records its constructor arguments in `model.config` (plain JSON, with the preset `name`), and
`build_model_from_config(model.config)` rebuilds the same architecture, which is how checkpoints are loaded.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence

from ..errors import ConfigError, UnknownNameError
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
# Paper settings (design.md): MoA in even blocks and MoE MLP in odd blocks, MoA head_dim 128 (= 2 * dim / heads),
# MoE MLP expert hidden = dim with top-4 (same active compute as a 4x dense MLP), no noisy gating.

_TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
_S = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.1)
_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.1)

_TINY_MOE = dict(router="per_task", moe_every=1, moe_layout="both", attn_experts=8, attn_top_k=2, attn_head_dim=32,
                 mlp_experts=8, mlp_top_k=2, mlp_expert_hidden=64)
_S_MOE = dict(router="per_task", moe_every=1, moe_layout="alternate", attn_experts=15, attn_top_k=6,
              attn_head_dim=128, mlp_experts=16, mlp_top_k=4, mlp_expert_hidden=384)
_B_MOE = dict(router="per_task", moe_every=1, moe_layout="alternate", attn_experts=24, attn_top_k=12,
              attn_head_dim=128, mlp_experts=16, mlp_top_k=4, mlp_expert_hidden=768)


@register_model
def modsquad_vit_tiny(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Tiny Mod-Squad ViT for tests and the CPU demo: dim 64, 4 blocks, MoA + MoE MLP in every block."""
    return _create("modsquad_vit_tiny", tasks, img_size, {**_TINY, **_TINY_MOE}, overrides)


@register_model
def modsquad_vit_s(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Mod-Squad ViT-S/16: MoA 15 experts top-6, MoE MLP 16 experts top-4, alternating blocks."""
    return _create("modsquad_vit_s", tasks, img_size, {**_S, **_S_MOE}, overrides)


@register_model
def modsquad_vit_b(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Mod-Squad ViT-B/16: MoA 24 experts top-12, MoE MLP 16 experts top-4, alternating blocks."""
    return _create("modsquad_vit_b", tasks, img_size, {**_B, **_B_MOE}, overrides)


@register_model
def dense_vit_tiny(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Dense twin of modsquad_vit_tiny: shared ViT encoder, one head per task."""
    return _create("dense_vit_tiny", tasks, img_size, {**_TINY, **_TINY_MOE, "router": "dense"}, overrides)


@register_model
def dense_vit_s(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Dense twin of modsquad_vit_s (the usual multi-task ViT-S baseline)."""
    return _create("dense_vit_s", tasks, img_size, {**_S, **_S_MOE, "router": "dense"}, overrides)


@register_model
def dense_vit_b(tasks: Sequence[str], img_size=224, **overrides) -> MultiTaskViT:
    """Dense twin of modsquad_vit_b."""
    return _create("dense_vit_b", tasks, img_size, {**_B, **_B_MOE, "router": "dense"}, overrides)
