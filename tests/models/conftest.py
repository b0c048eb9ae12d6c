"""Tiny MultiTaskViT builders shared by the model tests (dim 32, 2 blocks, 32 px images -> 16 tokens)."""

import pytest
import torch

from modsquad.models import MultiTaskViT

TASKS = ["depth_euclidean", "normal", "segment_semantic", "class_scene"]
IMG = 32


def tiny_vit(tasks=TASKS, **overrides) -> MultiTaskViT:
    kwargs = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, router="per_task",
                  moe_layout="both", attn_experts=4, attn_top_k=2, attn_head_dim=16, mlp_experts=4, mlp_top_k=2)
    kwargs.update(overrides)
    return MultiTaskViT(tasks=list(tasks), **kwargs)


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random values for every parameter, including the zero-initialised gates, so routing is not all ties."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@pytest.fixture
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_vit():
    """Factory fixture: `make_vit(tasks=..., **overrides)` (test modules cannot import conftest reliably)."""
    return tiny_vit


@pytest.fixture
def randomize():
    return randomize_
