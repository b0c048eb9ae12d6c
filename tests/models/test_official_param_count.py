"""The presets count exactly the parameters of the official Mod-Squad models (13 Taskonomy tasks), per layer kind.

Expected numbers are those of the official code (UMass-Foundation-Model/Mod-Squad, models_mt.py / models_moe.py /
parallel_experts/moe.py) as listed in design.md. Models are built on the meta device: nothing is allocated.
"""

import pytest
import torch

from modsquad.models import create_model
from modsquad.moe import MoEAttention, MoEMlp

TASKS = ["class_object", "class_scene", "depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture",
         "keypoints2d", "keypoints3d", "normal", "principal_curvature", "reshading", "segment_unsup2d",
         "segment_unsup25d"]


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_model(name: str, **overrides):
    with torch.device("meta"):
        return create_model(name, TASKS, img_size=224, **overrides)


def test_vit_s_counts_the_official_parameters_per_layer_kind():
    m = _meta_model("modsquad_vit_s")
    assert _n(m) == 55_436_245
    stem = (_n(m.patch_embed), m.cls_token.numel(), m.pos_embed.numel(), _n(m.norm) + _n(m.fc_norm))
    assert stem == (295_296, 384, 75_648, 1_536)
    assert m.task_embed.numel() == 4_992
    heads = {t: _n(h) for t, h in m.heads.items()}
    assert heads["class_object"] == 385_768 and heads["class_scene"] == 141_293
    dense_channels = sum(m.task_specs[t].channels for t in TASKS if m.task_specs[t].is_dense)
    assert dense_channels == 16 and sum(heads.values()) == 2_104_021
    assert all(heads[t] == 98_560 * m.task_specs[t].channels for t in TASKS if m.task_specs[t].is_dense)
    for i, blk in enumerate(m.blocks):
        assert _n(blk.norm1) + _n(blk.norm2) == 1_536
        if i % 2 == 0:  # MoA (incl. 13 gates) + dense MLP
            assert isinstance(blk.attn, MoEAttention) and not isinstance(blk.mlp, MoEMlp)
            assert (_n(blk.attn), _n(blk.attn.router), _n(blk.mlp)) == (1_648_000, 13 * 384 * 15, 1_181_568)
        else:  # dense attention 6 x 128 + MoE MLP (incl. 13 gates)
            assert isinstance(blk.mlp, MoEMlp) and not isinstance(blk.attn, MoEAttention)
            assert (_n(blk.attn), _n(blk.mlp), _n(blk.mlp.router)) == (1_182_336, 4_810_752, 13 * 384 * 16)
    assert sum(_n(b.norm1) + _n(b.norm2) for b in m.blocks) == 18_432
    pair = [_n(b) - _n(b.norm1) - _n(b.norm2) for b in m.blocks[:2]]
    assert sum(pair) == 8_822_656  # per even + odd block pair, LayerNorms aside
    assert [_n(b) for b in m.blocks[:2]] == [2_831_104, 5_994_624]  # with their LayerNorms (design.md)


def test_vit_b_counts_the_official_parameters():
    m = _meta_model("modsquad_vit_b")
    assert _n(m) == 206_956_117
    assert m.blocks[0].attn.num_experts == 24 and m.blocks[0].attn.top_k == 12
    assert m.blocks[1].mlp.expert_hidden == 768 and m.blocks[1].attn.head_dim == 128


def test_official_preset_options_and_modsquad_variants():
    m = _meta_model("modsquad_vit_s")
    cfg = m.config
    assert (cfg["gate_values"], cfg["task_embed"], cfg["mi_reduce"], cfg["moa_bias"], cfg["input_norm"]) == \
        ("topk_probs", "every_block", "sum", "official", "minus1_1")
    attn = m.blocks[0].attn
    assert attn.q_bias is None and attn.o_bias is None and attn.kv.bias is not None
    assert m.blocks[1].mlp.router.gate_values == "topk_probs"
    from modsquad.models.registry import MODSQUAD_VARIANTS

    v = _meta_model("modsquad_vit_s", **MODSQUAD_VARIANTS)
    assert v.cls_token is None and v.fc_norm is None and v.blocks[0].attn.o_bias is not None
    assert v.blocks[1].attn.head_dim == 64
    dense = _meta_model("dense_vit_s")
    assert dense.blocks[0].attn.head_dim == 64 and dense.moe_layers() == []


@pytest.mark.parametrize("name", ["modsquad_vit_tiny", "dense_vit_tiny"])
def test_tiny_presets_keep_modsquads_variants(name):
    m = _meta_model(name)
    assert m.cls_token is None and m.fc_norm is None and m.config["gate_values"] == "renormalized"
