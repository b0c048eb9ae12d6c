"""MultiTaskViT: a ViT encoder whose attention and MLP layers may be task-routed mixtures of experts.

Mod-Squad (Chen et al., CVPR 2023) puts MoE attention (MoA) in even blocks and MoE MLP in odd blocks; every task
runs through the same encoder and picks its own experts through a router, so that later each task can be
extracted with only the experts it uses. All requested tasks run in one forward: the token batch is repeated
once per task (`[T*B, N, D]`) with a task id per sample, so each MoE layer sees all tasks' tokens in one grouped
expert call. Each task then reads its slice through its own head.

Image size: the model is built for `img_size`, but any input whose height and width are multiples of
`patch_size` works; the position embedding is resampled (bicubic, timm `resample_abs_pos_embed`) to the new
patch grid. Outputs of dense heads always have the input's height and width.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import ConfigError, UnknownNameError
from ..moe import GATE_VALUES, MOA_BIAS, MoEAttention, MoELayer, MoEMlp, moe_aux_losses, router_names
from ..moe import ROUTERS as MOE_ROUTERS
from ..moe.losses import MI_REDUCE, TASK_PRIORS
from ..moe.routers import is_exporting
from ..tasks import get_task
from .heads import HEAD_TYPES, build_head

ROUTERS = ("dense", *MOE_ROUTERS)
MOE_LAYOUTS = ("alternate", "both", "attn", "mlp")
AUX_LOSS_KEYS = ("mi", "balance", "z", "task_prior")
_AUX_DEFAULTS = {"mi": True, "balance": True, "z": True, "task_prior": "uniform"}
TASK_EMBED_MODES = ("every_block", "input")
INPUT_NORMS = ("imagenet", "minus1_1")
# ImageNet mean/std (timm's IMAGENET_DEFAULT_*), the normalisation every modsquad loader and `predict` apply
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DenseAttention(Attention):
    """timm multi-head self-attention with the MoE call signature; the task ids are not needed.

    `attn_head_dim` may differ from dim / num_heads (the official Mod-Squad dense attention uses 6 x 128 in
    ViT-S): qkv is then Linear(dim, 3 * num_heads * head_dim) and proj Linear(num_heads * head_dim, dim).
    """

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class DenseMlp(Mlp):
    """timm MLP with the MoE call signature; the task ids are not needed."""

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class Block(nn.Module):
    """Pre-norm transformer block whose `attn` and `mlp` may each be dense or MoE.

    x: [B, N, D], task_ids: [B] -> [B, N, D].
    """

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, drop_path: float = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), task_ids))
        x = x + self.drop_path2(self.mlp(self.norm2(x), task_ids))
        return x


def moe_placement(depth: int, moe_every: int, moe_layout: str) -> list[tuple[bool, bool]]:
    """(MoE attention?, MoE MLP?) per block.

    Blocks `moe_every - 1, 2 * moe_every - 1, ...` are selected (every block for 1, the odd blocks for 2, as in
    V-MoE). Among the selected blocks, "alternate" gives MoA to the 1st, 3rd, ... and MoE MLP to the 2nd, 4th,
    ... (Mod-Squad with moe_every=1: MoA in even blocks, MoE MLP in odd blocks); "both" gives both to each;
    "attn" / "mlp" give only one kind.
    """
    selected = [i for i in range(depth) if (i + 1) % moe_every == 0]
    place = [(False, False)] * depth
    for j, i in enumerate(selected):
        if moe_layout == "alternate":
            place[i] = (j % 2 == 0, j % 2 == 1)
        else:
            place[i] = (moe_layout in ("both", "attn"), moe_layout in ("both", "mlp"))
    return place


def _per_layer(value, count: int, field: str) -> list[int]:
    """An int (same for every MoE layer of one kind) or a list with one entry per such layer -> list of ints."""
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ConfigError(f"{field} must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        return [value] * count
    if len(value) != count or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{field} has {len(value)} entries but the model has {count} such MoE layers "
                          f"(give one int per layer, or a single int)")
    return list(value)


def _kept_per_layer(value, experts: list[int], field: str) -> list[list[int] | None]:
    """Kept expert ids per MoE layer of one kind (extracted models with raw top-k prob gates keep every gate row
    but only these experts' weights), or None per layer. `experts` are the layers' gate row counts."""
    if value is None:
        return [None] * len(experts)
    if not isinstance(value, (list, tuple)) or len(value) != len(experts):
        raise ConfigError(f"{field} must be a list with one entry (a list of expert ids or null) per MoE layer "
                          f"({len(experts)}), got {value!r}")
    out = []
    for i, (ids, e) in enumerate(zip(value, experts, strict=True)):
        if ids is not None and (not isinstance(ids, (list, tuple)) or not ids or
                                any(isinstance(j, bool) or not isinstance(j, int) for j in ids) or
                                list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= e):
            raise ConfigError(f"{field}[{i}] must be sorted distinct expert ids in [0, {e}), got {ids!r}")
        out.append(None if ids is None else list(ids))
    return out


def _plain(value):
    """Tuples -> lists (recursively) so that the config survives a JSON round trip unchanged."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@contextmanager
def _restore_buffers(module: nn.Module):
    """Undo buffer updates (expert usage counts) made while activation checkpointing recomputes a block."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                module.get_buffer(name).copy_(value)


def _checkpoint_contexts(module: nn.Module):
    return nullcontext(), _restore_buffers(module)


class MultiTaskViT(nn.Module):
    """Multi-task ViT with task-routed MoE attention / MLP (Mod-Squad) or dense layers (`router="dense"`).

    Args:
        tasks: task names from `modsquad.tasks`; a task's index is its position in this list.
        img_size, patch_size, in_chans, embed_dim, depth: as in timm's VisionTransformer.
        num_heads: heads of the dense attention layers.
        mlp_ratio: dense MLP hidden = embed_dim * mlp_ratio; also the MoE MLP's reference hidden size.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after projections, on attention, stochastic depth
            (linearly increasing over blocks).
        router: "per_task" | "task_conditioned" | "task_level" | "shared" | "dense" (no MoE at all).
        router_kwargs: passed to every router (e.g. `{"noisy": True}`, `{"mode": "gumbel"}`).
        moe_every, moe_layout: where MoE layers go, see `moe_placement`.
        attn_experts, attn_top_k: MoA experts and experts per token; an int or one entry per MoA layer.
        attn_head_dim: MoA expert head size (default 2 * embed_dim / num_heads, as Mod-Squad).
        mlp_experts, mlp_top_k: MoE MLP experts and experts per token; an int or one entry per MoE MLP layer.
        mlp_expert_hidden: hidden size of one MLP expert (default dense hidden // top_k: same active compute).
        head: "linear" (Mod-Squad patch head) or "conv" (progressive upsampling) for dense tasks.
        use_task_embed: add a learned task embedding to the tokens of each task's copy. Default: on for MoE
            models, off for dense ones, whose encoder is then task-independent and runs once per batch.
        aux_losses: which auxiliary MoE losses `aux_losses()` returns: {"mi", "balance", "z": bool,
            "task_prior": "uniform" | "tokens" | "official"}.
        Official Mod-Squad options (the defaults here keep modsquad's own variants, so saved configs rebuild the
        same model; the modsquad_vit_s / _b presets set the official values):
        gate_values: "renormalized" (softmax over the chosen k logits) | "topk_probs" (raw softmax + 1e-4 of the
            chosen experts, official).
        task_embed: "input" (task embedding added once, before the first block) | "every_block" (added before
            every block, official).
        mi_reduce: "mean" | "sum" (official) of the per-layer MI losses.
        moa_bias: "qo_bias" (per-expert query bias and a shared output bias) | "official" (only the shared
            key/value projection has a bias).
        dense_attn_head_dim: head size of the dense attention layers (None: embed_dim // num_heads; the
            official Mod-Squad dense attention uses 128, i.e. 6 x 128 in ViT-S).
        input_norm: "imagenet" (images as the loaders give them, ImageNet mean/std) | "minus1_1" (the model
            maps them back to [0, 1] and then to [-1, 1], the official inputs).
        class_token: prepend a learned class token (position-embedded; dropped before the dense heads).
        fc_norm: classification tasks pool the patch tokens before the final norm and apply a separate
            `fc_norm` LayerNorm (official); otherwise they pool the final-normed tokens.
    """

    def __init__(
            self,
            tasks: list[str],
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            router: str = "per_task",
            router_kwargs: dict | None = None,
            moe_every: int = 1,
            moe_layout: str = "alternate",
            attn_experts: int | list[int] = 15,
            attn_top_k: int | list[int] = 6,
            attn_head_dim: int | None = None,
            mlp_experts: int | list[int] = 16,
            mlp_top_k: int | list[int] = 4,
            mlp_expert_hidden: int | None = None,
            head: str = "linear",
            use_task_embed: bool | None = None,
            aux_losses: dict | None = None,
            gate_values: str = "renormalized",
            task_embed: str = "input",
            mi_reduce: str = "mean",
            moa_bias: str = "qo_bias",
            dense_attn_head_dim: int | None = None,
            input_norm: str = "imagenet",
            class_token: bool = False,
            fc_norm: bool = False,
            attn_kept_experts: list | None = None,
            mlp_kept_experts: list | None = None,
    ):
        super().__init__()
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(tasks)
        if not tasks:
            raise ConfigError("tasks is empty: give at least one task name")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"tasks has duplicates: {tasks}")
        if router != "dense" and router not in router_names():  # registered routers count too
            raise ConfigError(f"router must be one of {('dense', *router_names())}, got {router!r} (a router "
                              f"defined outside modsquad is known once the module that registers it is imported)")
        if moe_layout not in MOE_LAYOUTS:
            raise ConfigError(f"moe_layout must be one of {MOE_LAYOUTS}, got {moe_layout!r}")
        if head not in HEAD_TYPES:
            raise ConfigError(f"head must be one of {HEAD_TYPES}, got {head!r}")
        if not isinstance(moe_every, int) or moe_every < 1:
            raise ConfigError(f"moe_every must be an int >= 1, got {moe_every!r}")
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        unknown = set(aux_losses or {}) - set(AUX_LOSS_KEYS)
        if unknown:
            raise ConfigError(f"aux_losses: unknown key(s) {sorted(unknown)}; known: {list(AUX_LOSS_KEYS)}")
        aux_cfg = {**_AUX_DEFAULTS, **(aux_losses or {})}
        if aux_cfg["task_prior"] not in TASK_PRIORS:
            raise ConfigError(f"aux_losses.task_prior must be one of {TASK_PRIORS}, got {aux_cfg['task_prior']!r}")
        for field, value, choices in (("gate_values", gate_values, GATE_VALUES),
                                      ("task_embed", task_embed, TASK_EMBED_MODES),
                                      ("mi_reduce", mi_reduce, MI_REDUCE), ("moa_bias", moa_bias, MOA_BIAS),
                                      ("input_norm", input_norm, INPUT_NORMS)):
            if value not in choices:
                raise ConfigError(f"{field} must be one of {choices}, got {value!r}")
        if dense_attn_head_dim is not None and (isinstance(dense_attn_head_dim, bool) or
                                                not isinstance(dense_attn_head_dim, int) or dense_attn_head_dim < 1):
            raise ConfigError(f"dense_attn_head_dim must be a positive int or null, got {dense_attn_head_dim!r}")
        router_kwargs = dict(router_kwargs or {})
        use_task_embed = router != "dense" if use_task_embed is None else bool(use_task_embed)
        attn_head_dim = attn_head_dim or 2 * embed_dim // num_heads
        mlp_hidden = int(embed_dim * mlp_ratio)

        self.config = _plain(dict(
            name=None, tasks=tasks, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, router=router,
            router_kwargs=router_kwargs, moe_every=moe_every, moe_layout=moe_layout, attn_experts=attn_experts,
            attn_top_k=attn_top_k, attn_head_dim=attn_head_dim, mlp_experts=mlp_experts, mlp_top_k=mlp_top_k,
            mlp_expert_hidden=mlp_expert_hidden, head=head, use_task_embed=use_task_embed, aux_losses=aux_cfg,
            gate_values=gate_values, task_embed=task_embed, mi_reduce=mi_reduce, moa_bias=moa_bias,
            dense_attn_head_dim=dense_attn_head_dim, input_norm=input_norm, class_token=bool(class_token),
            fc_norm=bool(fc_norm), attn_kept_experts=attn_kept_experts, mlp_kept_experts=mlp_kept_experts,
        ))
        self.tasks = tasks
        self.task_specs = {t: get_task(t) for t in tasks}
        self.num_tasks = len(tasks)
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.aux_loss_cfg = aux_cfg
        self.mi_reduce = mi_reduce
        self.task_embed_mode = task_embed
        self.grad_checkpointing = False
        if input_norm == "minus1_1":  # x_01 = x * std + mean, then 2 * x_01 - 1: one affine map per channel
            scale = 2 * torch.tensor(_IMAGENET_STD)
            shift = 2 * torch.tensor(_IMAGENET_MEAN) - 1
            self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
            if in_chans != 3:
                raise ConfigError(f"input_norm 'minus1_1' needs 3-channel images, got in_chans={in_chans}")
        else:
            self.input_scale = self.input_shift = None

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False)
        self.num_prefix_tokens = 1 if class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches,
                                                  embed_dim))
        self.task_embed = nn.Parameter(torch.zeros(self.num_tasks, embed_dim)) if use_task_embed else None
        self.pos_drop = nn.Dropout(drop_rate)

        place = moe_placement(depth, moe_every, moe_layout) if router != "dense" else [(False, False)] * depth
        n_attn, n_mlp = sum(a for a, _ in place), sum(m for _, m in place)
        attn_e = _per_layer(attn_experts, n_attn, "attn_experts")
        attn_k = _per_layer(attn_top_k, n_attn, "attn_top_k")
        mlp_e = _per_layer(mlp_experts, n_mlp, "mlp_experts")
        mlp_k = _per_layer(mlp_top_k, n_mlp, "mlp_top_k")
        attn_kept = _kept_per_layer(attn_kept_experts, attn_e, "attn_kept_experts")
        mlp_kept = _kept_per_layer(mlp_kept_experts, mlp_e, "mlp_kept_experts")
        for field, es, ks, kept in (("attn", attn_e, attn_k, attn_kept), ("mlp", mlp_e, mlp_k, mlp_kept)):
            for i, (e, k, kk) in enumerate(zip(es, ks, kept, strict=True)):
                e = e if kk is None else len(kk)
                if not 1 <= k <= e:
                    raise ConfigError(f"{field}_top_k must be in [1, {field}_experts]; MoE {field} layer {i} "
                                      f"has {e} experts and top_k {k}")

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        moe = dict(num_tasks=self.num_tasks, router=router, router_kwargs=router_kwargs, gate_values=gate_values)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        blocks = []
        try:
            for i, (moe_attn, moe_mlp) in enumerate(place):
                if moe_attn:
                    attn = MoEAttention(embed_dim, attn_head_dim, attn_e.pop(0), attn_k.pop(0), qkv_bias=qkv_bias,
                                        attn_drop=attn_drop_rate, proj_drop=drop_rate, bias=moa_bias,
                                        kept_experts=attn_kept.pop(0), **moe)
                else:
                    attn = DenseAttention(embed_dim, num_heads=num_heads, attn_head_dim=dense_attn_head_dim,
                                          qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
                if moe_mlp:
                    mlp = MoEMlp(embed_dim, mlp_hidden, mlp_e.pop(0), mlp_k.pop(0), expert_hidden=mlp_expert_hidden,
                                 drop=drop_rate, kept_experts=mlp_kept.pop(0), **moe)
                else:
                    mlp = DenseMlp(embed_dim, mlp_hidden, drop=drop_rate)
                blocks.append(Block(embed_dim, attn, mlp, drop_path=dpr[i], norm_layer=norm_layer))
        except TypeError as err:  # a misspelt router_kwargs key reaches the router's constructor
            if not router_kwargs:
                raise
            raise ConfigError(f"router_kwargs {router_kwargs} do not fit router {router!r}: {err}") from None
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if fc_norm else None
        self.heads = nn.ModuleDict({t: build_head(self.task_specs[t], embed_dim, patch_size, head) for t in tasks})
        # With no task embedding and no router, every task's tokens would be identical: run the encoder once.
        self.task_dependent = use_task_embed or bool(self.moe_layers())
        self.init_weights()

    # --- construction helpers -------------------------------------------------------------------------

    def init_weights(self) -> None:
        """timm ViT init (trunc-normal 0.02 Linear, zero bias) for everything but the MoE layers, which own
        their init (e.g. zero-initialised per-task gates)."""
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.task_embed is not None:
            trunc_normal_(self.task_embed, std=.02)
        moe_names = [name + "." for name, _ in self.moe_layers()]
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not any(name.startswith(p) for p in moe_names):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position / task embeddings, norm weights and biases (also the stacked [E, out] expert biases)."""
        names = {n for n in ("pos_embed", "cls_token", "task_embed") if getattr(self, n) is not None}
        return names | {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("bias")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward to save activation memory (expert usage is not double-counted)."""
        self.grad_checkpointing = enable

    # --- MoE introspection ----------------------------------------------------------------------------

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        """[(name, layer)] of every MoE layer in block order, e.g. ("blocks.0.attn", MoEAttention)."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MoELayer)]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary MoE losses of the last forward (name -> scalar); {} for a dense model."""
        layers = [m for _, m in self.moe_layers()]
        if not layers:
            return {}
        cfg = self.aux_loss_cfg
        return moe_aux_losses(layers, mi=cfg["mi"], balance=cfg["balance"], z=cfg["z"],
                              task_prior=cfg["task_prior"], mi_reduce=self.mi_reduce)

    def expert_usage(self) -> dict[str, dict[str, list[int]]]:
        """{task: {layer name: top-k selection count per expert}} accumulated since `reset_usage()`."""
        usage = {t: {} for t in self.tasks}
        for name, layer in self.moe_layers():
            counts = layer.usage.detach().long().cpu().tolist()  # [num_tasks, E]
            for t, row in zip(self.tasks, counts, strict=True):
                usage[t][name] = row
        return usage

    def reset_usage(self) -> None:
        for _, layer in self.moe_layers():
            layer.reset_usage()

    @property
    def pretrained_cfg(self) -> dict:
        """What the caller must feed the model, timm-style (`timm.data.resolve_data_config(model=model)` reads it):
        RGB in [0, 1] normalised with ImageNet mean/std, [3, H, W] at `img_size` (any multiple of `patch_size`
        works). `input_norm="minus1_1"` models take the same input and map it to [-1, 1] themselves."""
        size = self.config["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"input_size": (self.in_chans, h, w), "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD,
                "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "fixed_input_size": False,
                "patch_size": self.patch_size, "num_classes": 0, "input_norm": self.config["input_norm"],
                "tasks": list(self.tasks)}

    # --- forward --------------------------------------------------------------------------------------

    def task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise UnknownNameError(f"model has no task {task!r}; its tasks: {', '.join(self.tasks)}") from None

    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def _pos_embed(self, grid_size: tuple[int, int]) -> torch.Tensor:
        # exporting always resamples (identity at the built size): the graph then takes any H and W
        if tuple(grid_size) == tuple(self.patch_embed.grid_size) and not is_exporting():
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid_size),
                                      old_size=list(self.patch_embed.grid_size),
                                      num_prefix_tokens=self.num_prefix_tokens)

    def _run_blocks(self, x: torch.Tensor, task_ids: torch.Tensor | None,
                    task_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B', P+N, D]; `task_tokens` [B', 1, D] is added before every block (task_embed="every_block")."""
        for blk in self.blocks:
            if task_tokens is not None:
                x = x + task_tokens
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, task_ids, use_reentrant=False, context_fn=partial(_checkpoint_contexts, blk))
            else:
                x = blk(x, task_ids)
        return x

    def _embed(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """images: [B, C, H, W] -> tokens [B, P+N, D] (P = 1 with a class token), position-embedded."""
        if self.input_scale is not None:
            images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        x = self.patch_embed(images)  # [B, N, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(x + self._pos_embed(grid))

    def _head_tokens(self, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """Block output x: [T, B, P+N, D] (T = 1 when every task shares it) -> head inputs [len(tasks), B, N, D].

        Dense tasks (and, without `fc_norm`, all tasks) get the final-normed patch tokens. With `fc_norm`,
        classification tasks get fc_norm(mean of the un-normed patch tokens) repeated over the N positions, so
        that the classification head's own mean pooling returns it unchanged.
        """
        patches = x[:, :, self.num_prefix_tokens:]
        normed = self.norm(patches)
        pooled = [i for i, t in enumerate(tasks) if self.fc_norm is not None and not self.task_specs[t].is_dense]
        if not pooled:
            return normed.expand(len(tasks), -1, -1, -1) if normed.shape[0] == 1 else normed
        out = normed.expand(len(tasks), -1, -1, -1).clone() if normed.shape[0] == 1 else normed.clone()
        for i in pooled:
            src = patches[0 if patches.shape[0] == 1 else i]
            out[i] = self.fc_norm(src.mean(1, keepdim=True)).expand_as(src)
        return out

    def forward_features(self, images: torch.Tensor, tasks: list[str] | None = None
                         ) -> tuple[torch.Tensor, tuple[int, int]]:
        """images: [B, C, H, W] -> (head input tokens [T, B, N, D] for the T requested tasks, patch grid (h, w)).

        The tokens are the final-normed patch tokens (the class token, if any, is dropped); see `_head_tokens`
        for classification tasks with `fc_norm`.
        """
        tasks = self.tasks if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
        ids = [self.task_index(t) for t in tasks]
        grid = self._check_images(images)
        x = self._embed(images, grid)  # [B, P+N, D]
        if not self.task_dependent:
            return self._head_tokens(self._run_blocks(x, None).unsqueeze(0), tasks), grid
        b, n, d = x.shape
        ids = torch.tensor(ids, device=x.device)
        task_ids = ids.repeat_interleave(b)  # [T*B]: the copy for task t holds samples t*B .. t*B + B-1
        x = x.unsqueeze(0).expand(len(ids), -1, -1, -1).reshape(len(ids) * b, n, d)  # [T*B, P+N, D]
        task_tokens = None
        if self.task_embed is not None:
            task_tokens = self.task_embed[task_ids].unsqueeze(1).to(x.dtype)  # [T*B, 1, D]
            if self.task_embed_mode == "input":
                x, task_tokens = x + task_tokens, None
        # one task: its id as a 0-dim tensor, which the MoE layers expand without copying, so that routers compute
        # only that task's gate (`moe.routers.shared_task`)
        x = self._run_blocks(x, ids[0] if len(ids) == 1 else task_ids, task_tokens)
        return self._head_tokens(x.view(len(ids), b, n, d), tasks), grid

    def forward(self, images: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """images: [B, C, H, W] -> {task: [B, C_t, H, W] (dense) or [B, classes] (classification)}."""
        tasks = self.tasks if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
        feats, grid = self.forward_features(images, tasks)
        return {t: self.heads[t](feats[i], grid) for i, t in enumerate(tasks)}
