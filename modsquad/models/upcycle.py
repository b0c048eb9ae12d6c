"""Sparse upcycling: initialise a `MultiTaskViT` from a dense timm ViT checkpoint, a file or a pretrained name.

`train.init_from` is a local checkpoint file, `timm:<model>.<tag>` (e.g. `timm:vit_small_patch16_224.augreg_in21k_
ft_in1k`: the Hugging Face repository named by that timm model's `pretrained_cfg.hf_hub_id`) or `hf-hub:<repo>[@rev]`.
Names are fetched with `huggingface_hub` into its cache, as timm's own pretrained loading does; offline
(HF_HUB_OFFLINE=1) only the local cache (HF_HUB_CACHE, else HF_HOME/hub) is read. A file path is never downloaded.

The checkpoint is read and adapted by timm itself (`timm.models.load_state_dict` + the ViT
`checkpoint_filter_fn`, which also resamples the position embedding to the new patch grid and the patch
embedding to a new patch size) into a dense timm `VisionTransformer` of the checkpoint's shape. Its weights
are then copied into the multi-task model:

- patch embedding, position embedding (patch tokens, and the class token's when both have one), class token,
  block norms, final norm, dense attention and dense MLP layers: copied as they are;
- MoE layers initialise themselves from the dense layer they replace (`MoELayer.upcycle`):
- MoE MLP: expert e takes the hidden units `[e*h, (e+1)*h)` (mod the dense hidden size H) of the dense
  fc1/fc2, fc2 scaled by H / h. With the default expert hidden H / top_k and zero-initialised routers (all
  tokens pick experts 0..k-1 with weight 1/k), the upcycled MoE MLP computes exactly the dense MLP;
- MoE attention: expert e takes the query rows and output-projection columns of the dense units
  `[e*hd, (e+1)*hd)` (mod dim), i.e. a group of dense heads, output scaled by dim / hd; the shared
  key/value projection takes the keys/values of the first group. MoA shares K/V between its experts and
  dense attention does not, so only experts that own the first head group start as their dense heads.

Task heads, task embeddings and routers keep their own initialisation.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

import torch
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..core.errors import CheckpointError
from ..moe import MoELayer


def _num_prefix_tokens(state: dict[str, torch.Tensor]) -> int:
    """Class/register tokens that carry a position embedding in the checkpoint (0 for no_embed_class)."""
    prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    n = state["pos_embed"].shape[1] - prefix
    return prefix if n >= 0 and math.isqrt(n) ** 2 == n else 0


TIMM_PREFIX, HUB_PREFIX = "timm:", "hf-hub:"
#: weight files of a timm repository on the Hub, in the order timm's loader tries them
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _hub_settings() -> tuple[str | None, bool]:
    """(cache folder, offline) from the environment now (huggingface_hub reads both only once, at import)."""
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else None)
    flag = os.environ.get("HF_HUB_OFFLINE")
    offline = flag.strip().lower() in ("1", "true", "yes", "on") if flag is not None else bool(constants.HF_HUB_OFFLINE)
    return cache, offline


def _hub_repo_of(spec: str) -> tuple[str, str | None]:
    """(repo id, revision) of `timm:<name>` (its pretrained_cfg.hf_hub_id) or `hf-hub:<repo>[@rev]`."""
    if spec.startswith(HUB_PREFIX):
        repo = spec[len(HUB_PREFIX):]
    else:
        import timm
        from timm.models import get_pretrained_cfg

        name = spec[len(TIMM_PREFIX):]
        cfg = get_pretrained_cfg(name) if name else None
        if cfg is None:
            known = timm.list_pretrained("vit_*")
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (`timm.list_pretrained('vit_*')` lists them)"
            raise CheckpointError(f"train.init_from {spec}: timm has no pretrained weights named {name!r}{hint}")
        if not cfg.hf_hub_id:
            raise CheckpointError(f"train.init_from {spec}: timm hosts these weights outside the Hugging Face Hub; "
                                  f"download them and give the file's path")
        repo = cfg.hf_hub_id
    repo, _, revision = repo.partition("@")
    if not repo:
        raise CheckpointError(f"train.init_from {spec}: name a repository, e.g. hf-hub:timm/vit_small_patch16_224."
                              f"augreg_in21k_ft_in1k")
    return repo, revision or None


def resolve_init_from(spec: str | Path) -> Path:
    """The local checkpoint file of `train.init_from`: a path as it is, a `timm:` / `hf-hub:` name through the
    Hugging Face cache (downloaded into it unless offline). CheckpointError, one line, when it cannot be had."""
    text = str(spec)
    if not text.startswith((TIMM_PREFIX, HUB_PREFIX)):
        return Path(spec)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision = _hub_repo_of(text)
    cache, offline = _hub_settings()
    for filename in HUB_WEIGHTS:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=offline))
        except LocalEntryNotFoundError:  # not cached (offline) or no network (a subclass: caught first)
            if filename != HUB_WEIGHTS[-1]:
                continue
            where = cache or "the default Hugging Face cache"
            raise CheckpointError(
                f"train.init_from {text}: {repo} is not in {where} and it cannot be downloaded here"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; on a machine with network run "
                f"`hf download {repo}{f' --revision {revision}' if revision else ''}` and copy its "
                f"cache folder here (or point HF_HUB_CACHE at it)") from None
        except EntryNotFoundError:  # the repository has no such file: try the next name
            continue
        except RepositoryNotFoundError:
            raise CheckpointError(f"train.init_from {text}: no Hugging Face repository {repo!r}") from None
    raise CheckpointError(f"train.init_from {text}: {repo} has none of {', '.join(HUB_WEIGHTS)}")


def dense_vit_from_checkpoint(path: str | Path, img_size: int | tuple[int, int], patch_size: int,
                              num_heads: int) -> VisionTransformer:
    """A timm `VisionTransformer` shaped like the checkpoint at `path`, loaded through timm's filter.

    The grid (`img_size`, `patch_size`) is the target model's: timm resamples position and patch embeddings
    to it. `num_heads` cannot be read from weights and comes from the target model.
    """
    path = resolve_init_from(path)
    if not path.is_file():
        raise CheckpointError(f"train.init_from: {path} not found (give a local timm ViT checkpoint file, which "
                              f"modsquad never downloads, or a name: timm:MODEL.TAG or hf-hub:REPO)")
    try:
        state = load_state_dict(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None
    if "patch_embed.proj.weight" not in state or "blocks.0.mlp.fc1.weight" not in state:
        raise CheckpointError(f"{path}: not a timm ViT checkpoint (no patch_embed.proj / blocks.0.mlp.fc1 weights)")
    unsupported = [k for k in ("norm_pre.weight", "blocks.0.attn.q_norm.weight") if k in state]
    if unsupported:
        raise CheckpointError(f"{path}: {', '.join(unsupported)} have no counterpart in MultiTaskViT (ViTs with a "
                              f"pre-norm or q/k-norm cannot be upcycled)")
    embed_dim = state["patch_embed.proj.weight"].shape[0]
    if embed_dim % num_heads:
        raise CheckpointError(f"{path}: embed_dim {embed_dim} is not divisible by the model's {num_heads} heads")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    prefix = _num_prefix_tokens(state) if "pos_embed" in state else 0
    dense = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=state["patch_embed.proj.weight"].shape[1],
        num_classes=0, global_pool="token" if "cls_token" in state else "avg", embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state, class_token="cls_token" in state,
        reg_tokens=state["reg_token"].shape[1] if "reg_token" in state else 0,
        no_embed_class=prefix == 0 and ("cls_token" in state or "reg_token" in state), pos_embed="learn" if "pos_embed" in state else "none",
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        final_norm="norm.weight" in state or "fc_norm.weight" in state, fc_norm="fc_norm.weight" in state)
    state = {k: v for k, v in checkpoint_filter_fn(state, dense).items() if not k.startswith("head.")}
    missing, unexpected = dense.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not fit a timm ViT of its own shape "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return dense


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise CheckpointError(f"init_from: {what} has shape {tuple(src.shape)} in the checkpoint, "
                              f"{tuple(dst.shape)} in the model")
    dst.copy_(src)


@torch.no_grad()
def _fold_layer_scale(dense: VisionTransformer) -> None:
    """Multiply LayerScale gammas into attn.proj / mlp.fc2 (MultiTaskViT blocks have no LayerScale)."""
    for blk in dense.blocks:
        for ls, linear in ((blk.ls1, blk.attn.proj), (blk.ls2, blk.mlp.fc2)):
            gamma = getattr(ls, "gamma", None)
            if gamma is not None:
                linear.weight.mul_(gamma[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(gamma)
                ls.gamma.fill_(1.0)


@torch.no_grad()
def upcycle_from_timm(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Initialise `model` (a MultiTaskViT) in place from a dense timm ViT checkpoint: a file at `path`, or a
    `timm:<model>.<tag>` / `hf-hub:<repo>` name (see the module docstring).

    Returns counts of what was initialised: {"dense_layers", "moe_mlp", "moe_attn"}. Raises CheckpointError
    when the checkpoint is not a timm ViT or its width / depth differ from the model's.
    """
    cfg = model.config
    dense = dense_vit_from_checkpoint(path, cfg["img_size"], cfg["patch_size"], cfg["num_heads"])
    if dense.embed_dim != cfg["embed_dim"] or len(dense.blocks) != len(model.blocks):
        raise CheckpointError(f"{path}: checkpoint is a ViT of width {dense.embed_dim} and depth {len(dense.blocks)}; "
                              f"the model has width {cfg['embed_dim']} and depth {len(model.blocks)}")
    _fold_layer_scale(dense)
    _copy(model.patch_embed.proj.weight, dense.patch_embed.proj.weight, "patch_embed.proj.weight")
    if model.patch_embed.proj.bias is not None and dense.patch_embed.proj.bias is not None:
        _copy(model.patch_embed.proj.bias, dense.patch_embed.proj.bias, "patch_embed.proj.bias")
    if dense.pos_embed is not None:
        prefix = 0 if dense.no_embed_class else dense.num_prefix_tokens
        _copy(model.pos_embed[:, model.num_prefix_tokens:], dense.pos_embed[:, prefix:], "pos_embed")
        if model.num_prefix_tokens and prefix and dense.cls_token is not None:
            _copy(model.pos_embed[:, :1], dense.pos_embed[:, :1], "pos_embed (class token)")
    if model.cls_token is not None and dense.cls_token is not None:
        _copy(model.cls_token, dense.cls_token, "cls_token")
    counts = {"dense_layers": 0, "moe_mlp": 0, "moe_attn": 0}
    for i, (blk, src) in enumerate(zip(model.blocks, dense.blocks, strict=True)):
        blk.norm1.load_state_dict(src.norm1.state_dict())
        blk.norm2.load_state_dict(src.norm2.state_dict())
        for name, mine, theirs in (("attn", blk.attn, src.attn), ("mlp", blk.mlp, src.mlp)):
            if isinstance(mine, MoELayer):
                mine.upcycle(theirs)
                counts[f"moe_{mine.kind}"] = counts.get(f"moe_{mine.kind}", 0) + 1
            else:
                try:
                    mine.load_state_dict(theirs.state_dict())
                except RuntimeError as e:
                    raise CheckpointError(f"{path}: blocks.{i}.{name} does not fit the model: "
                                          f"{str(e).splitlines()[-1].strip()}") from None
                counts["dense_layers"] += 1
    final = dense.norm if isinstance(dense.norm, nn.LayerNorm) else dense.fc_norm
    if isinstance(final, nn.LayerNorm):
        model.norm.load_state_dict(final.state_dict())
    return counts
