"""Tiny MoE ViTs with perturbed routers for the extraction tests (dim 32, 2 blocks, 32 px, patch 16 -> 4 tokens).

Few tokens and strongly random gates make every task pick only some of the 8 experts, so extraction really
drops experts and the exactness tests are not trivially true.
"""

import pytest
import torch

from modsquad.checkpoint import save_model
from modsquad.core.hashing import file_sha256
from modsquad.extract.usage import count_usage, save_usage, usage_report
from modsquad.models import MultiTaskViT

TASKS = ["depth_euclidean", "normal", "segment_semantic", "class_scene"]
IMG = 32
#: (router, router_kwargs) of every router kind the toolkit has.
ROUTER_KINDS = [
    ("per_task", {}),
    ("per_task", {"noisy": True}),
    ("task_conditioned", {}),
    ("task_level", {"mode": "softmax"}),
    ("task_level", {"mode": "gumbel_st"}),
    ("shared", {}),
]


def tiny_moe(router: str = "per_task", router_kwargs: dict | None = None, tasks=TASKS, seed: int = 0,
             **overrides) -> MultiTaskViT:
    kwargs = dict(img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, router=router,
                  router_kwargs=router_kwargs or {}, moe_layout="both", attn_experts=8, attn_top_k=2,
                  attn_head_dim=16, mlp_experts=8, mlp_top_k=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = MultiTaskViT(tasks=list(tasks), **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the gates start at zero (uniform, all ties): perturb them so routing is sparse
        for _, layer in model.moe_layers():
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        if model.task_embed is not None:
            model.task_embed.copy_(torch.randn(model.task_embed.shape, generator=g))
    return model.eval()


def random_images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def write_checkpoint(folder, model, images=None):
    """`folder/last.safetensors`, plus `folder/usage.json` counted on `images` when given; returns the ckpt path."""
    path = save_model(folder / "last.safetensors", model)
    if images is not None:
        counts, n = count_usage(model, [images])
        report = usage_report(model, counts, checkpoint=str(path), checkpoint_sha256=file_sha256(path),
                              data={"images": n})
        save_usage(report, folder)
    return path


@pytest.fixture
def make_moe():
    """Factory: `make_moe(router, router_kwargs, **overrides)` -> eval-mode tiny MoE ViT with random gates."""
    return tiny_moe


@pytest.fixture
def images():
    return random_images()
