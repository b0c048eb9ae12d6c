import pytest
import timm
import torch

import modsquad
from modsquad.core.errors import ConfigError, UnknownNameError
from modsquad.models import MultiTaskViT, create_model, list_models
from modsquad.moe import MoEAttention, MoEMlp

PRESETS = ["dense_vit_b", "dense_vit_s", "dense_vit_tiny", "modsquad_vit_b", "modsquad_vit_s", "modsquad_vit_tiny"]
TASKS = ["depth_euclidean", "normal"]


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _encoder_params(model: MultiTaskViT) -> int:
    """Everything but the heads, the task embedding and the classification-only fc_norm."""
    fc_norm = _params(model.fc_norm) if model.fc_norm is not None else 0
    return (_params(model) - _params(model.heads) - fc_norm
            - (model.task_embed.numel() if model.task_embed is not None else 0))


def _timm_encoder(name: str) -> torch.nn.Module:
    """timm's ViT with the same encoder as our dense twin (class token as the official Mod-Squad stem), no
    classifier."""
    return timm.create_model(name, pretrained=False, num_classes=0, class_token=True, global_pool="token")


def test_list_models():
    assert list_models() == PRESETS
    assert list_models("dense_*") == PRESETS[:3]


def test_unknown_name_and_override():
    with pytest.raises(UnknownNameError, match="known models: dense_vit_b"):
        create_model("vit_huge", TASKS)
    with pytest.raises(ConfigError, match="'embed_dimm'"):
        create_model("modsquad_vit_tiny", TASKS, embed_dimm=32)


def test_public_create_model_and_overrides():
    model = modsquad.create_model("modsquad_vit_tiny", tasks=TASKS, img_size=32, depth=2, drop_path_rate=0.05)
    assert isinstance(model, MultiTaskViT)
    assert model.config["name"] == "modsquad_vit_tiny"
    assert model.config["depth"] == 2 and len(model.blocks) == 2
    out = model(torch.randn(2, 3, 32, 32))
    assert out["normal"].shape == (2, 3, 32, 32)


def test_tiny_presets():
    moe = create_model("modsquad_vit_tiny", TASKS, img_size=32)
    dense = create_model("dense_vit_tiny", TASKS, img_size=32)
    assert len(moe.moe_layers()) == 8 and dense.moe_layers() == []
    assert _params(moe) < 1_000_000
    assert dense.config["embed_dim"] == moe.config["embed_dim"] == 64


def test_modsquad_vit_s_paper_layout():
    model = create_model("modsquad_vit_s", TASKS, img_size=64)
    for i, blk in enumerate(model.blocks):
        if i % 2 == 0:
            assert isinstance(blk.attn, MoEAttention) and not isinstance(blk.mlp, MoEMlp)
            assert (blk.attn.num_experts, blk.attn.top_k, blk.attn.head_dim) == (15, 6, 128)
        else:
            assert isinstance(blk.mlp, MoEMlp) and not isinstance(blk.attn, MoEAttention)
            assert (blk.mlp.num_experts, blk.mlp.top_k, blk.mlp.expert_hidden) == (16, 4, 384)
    assert model.config["drop_path_rate"] == 0.1
    assert model.config["router_kwargs"] == {"init_std": 0.02}  # the official gates end up trunc_normal(.02)
    assert 50e6 < _params(model) < 55e6
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["depth_euclidean"].shape == (1, 1, 64, 64)


def test_dense_vit_s_encoder_matches_timm():
    model = create_model("dense_vit_s", TASKS)
    assert model.moe_layers() == [] and model.task_embed is None
    assert _encoder_params(model) == _params(_timm_encoder("vit_small_patch16_224"))


def test_vit_b_presets_build():
    with torch.device("meta"):  # no weights materialised: only the architecture is checked
        moe = create_model("modsquad_vit_b", TASKS)
        dense = create_model("dense_vit_b", TASKS)
        ref = _timm_encoder("vit_base_patch16_224")
    attn = [m for n, m in moe.moe_layers() if n.endswith("attn")]
    mlp = [m for n, m in moe.moe_layers() if n.endswith("mlp")]
    assert len(attn) == len(mlp) == 6
    assert {(m.num_experts, m.top_k, m.head_dim) for m in attn} == {(24, 12, 128)}
    assert {(m.num_experts, m.top_k, m.expert_hidden) for m in mlp} == {(16, 4, 768)}
    assert _encoder_params(dense) == _params(ref)
    assert _params(moe) > 2 * _params(dense)
