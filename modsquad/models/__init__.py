"""Models: the multi-task (MoE) ViT, its task heads and the named presets."""

from .heads import ClassificationHead, ConvHead, LinearPatchHead, build_head
from .registry import build_model_from_config, create_model, list_models, register_model
from .vit import Block, MultiTaskViT, moe_placement

__all__ = [
    "Block", "ClassificationHead", "ConvHead", "LinearPatchHead", "MultiTaskViT", "build_head",
    "build_model_from_config", "create_model", "list_models", "moe_placement", "register_model",
]
