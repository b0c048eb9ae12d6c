"""Sparse upcycling from a dense timm ViT checkpoint saved locally (random weights, small dims)."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from modsquad.core.errors import CheckpointError
from modsquad.models import create_model
from modsquad.models.upcycle import resolve_init_from, upcycle_from_timm

TASKS = ["depth_euclidean", "normal"]
SMALL = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)


def _dense(**kw):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              **{"img_size": 64, **SMALL, **kw})
    with torch.no_grad():  # non-trivial norms and biases, so that copying them is checked
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _tiny(router="per_task", **kw):
    return create_model("modsquad_vit_tiny", TASKS, img_size=32, router=router, moe_layout="both",
                        **{**SMALL, **kw})


@pytest.fixture
def dense_pth(tmp_path):
    model = _dense()
    torch.save(model.state_dict(), tmp_path / "dense.pth")
    return model, tmp_path / "dense.pth"


def test_dense_model_gets_the_checkpoint_exactly(tmp_path):
    """Without class token, a dense MultiTaskViT computes the same features as the timm ViT it came from."""
    dense = _dense(img_size=32, class_token=False, global_pool="avg", fc_norm=False)
    save_file(dense.state_dict(), tmp_path / "dense.safetensors")
    model = _tiny(router="dense")
    assert upcycle_from_timm(model, tmp_path / "dense.safetensors") == {"dense_layers": 4, "moe_mlp": 0,
                                                                          "moe_attn": 0}
    images = torch.randn(2, 3, 32, 32)
    feats, _ = model.eval().forward_features(images)
    torch.testing.assert_close(feats[0], dense.eval().forward_features(images))


def test_moe_layers_are_sliced_from_the_dense_layers(dense_pth):
    dense, path = dense_pth
    model = _tiny(mlp_experts=4, mlp_top_k=2, mlp_expert_hidden=None, attn_experts=4, attn_top_k=2,
                  attn_head_dim=16)
    assert upcycle_from_timm(model, path) == {"dense_layers": 0, "moe_mlp": 2, "moe_attn": 2}
    # patch and position embeddings: the latter resampled from the checkpoint's 8x8 grid (+ cls) to 4x4
    assert torch.equal(model.patch_embed.proj.weight, dense.patch_embed.proj.weight)
    expected = resample_abs_pos_embed(dense.pos_embed, new_size=[4, 4], num_prefix_tokens=1)[:, 1:]
    torch.testing.assert_close(model.pos_embed, expected)
    assert torch.equal(model.norm.weight, dense.norm.weight)
    blk, src = model.blocks[0], dense.blocks[0]
    assert torch.equal(blk.norm1.bias, src.norm1.bias)

    # MoE MLP: hidden 64 = 2 experts x 32; zero-init routers pick experts 0, 1 with weight 1/2 -> dense MLP
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(blk.mlp(x, torch.tensor([0, 1])), src.mlp(x))
    assert torch.equal(blk.mlp.fc1.weight[2], blk.mlp.fc1.weight[0])  # experts 2, 3 wrap around

    # MoA: expert e owns dense head e (head_dim 16) as query / output rows; K/V from head 0
    q_w, k_w, _ = src.attn.qkv.weight.chunk(3)
    assert torch.equal(blk.attn.q_weight[1], q_w[16:32].t())
    assert torch.equal(blk.attn.o_weight[1], src.attn.proj.weight[:, 16:32].t() * 2)
    assert torch.equal(blk.attn.kv.weight[:16], k_w[:16])


def test_bad_checkpoints_are_checkpoint_errors(dense_pth, tmp_path):
    _, path = dense_pth
    with pytest.raises(CheckpointError, match="width 32 and depth 2"):
        upcycle_from_timm(_tiny(embed_dim=64), path)
    with pytest.raises(CheckpointError, match="never downloads"):
        upcycle_from_timm(_tiny(), tmp_path / "vit_small_patch16_224.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a timm ViT"):
        upcycle_from_timm(_tiny(), tmp_path / "other.pth")


# --- pretrained names through the local Hugging Face cache (no network) ---------------------------------

NAME = "vit_small_patch16_224.augreg_in21k_ft_in1k"


def fake_hub_cache(root, repo, state, filename="model.safetensors", commit="0" * 40):
    """Write `state` into `root` laid out as huggingface_hub's cache holds a downloaded repository:
    models--<org>--<name>/{refs/main, snapshots/<commit>/<filename>} (what timm's hf_hub_id loading reads)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    path = folder / "snapshots" / commit / filename
    save_file(state, path) if filename.endswith(".safetensors") else torch.save(state, path)
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_timm_name_is_read_from_the_local_hub_cache(offline_cache):
    """`timm:<name>.<tag>` -> pretrained_cfg.hf_hub_id (timm/<name>.<tag>) -> the cached model.safetensors; a tiny
    state dict stands in for the real weights, so the model is upcycled from exactly those tensors."""
    dense = _dense()
    fake_hub_cache(offline_cache, f"timm/{NAME}", {k: v.contiguous() for k, v in dense.state_dict().items()})
    model = _tiny(mlp_experts=4, mlp_top_k=2, mlp_expert_hidden=None, attn_experts=4, attn_top_k=2,
                  attn_head_dim=16)
    assert upcycle_from_timm(model, f"timm:{NAME}") == {"dense_layers": 0, "moe_mlp": 2, "moe_attn": 2}
    assert torch.equal(model.patch_embed.proj.weight, dense.patch_embed.proj.weight)
    assert torch.equal(model.blocks[1].norm1.bias, dense.blocks[1].norm1.bias)


def test_hf_hub_repo_with_a_pytorch_bin(offline_cache):
    dense = _dense()
    fake_hub_cache(offline_cache, "someone/tiny-vit", dense.state_dict(), filename="pytorch_model.bin")
    assert resolve_init_from("hf-hub:someone/tiny-vit").name == "pytorch_model.bin"
    model = _tiny()
    upcycle_from_timm(model, "hf-hub:someone/tiny-vit")
    assert torch.equal(model.norm.weight, dense.norm.weight)


def test_missing_or_unknown_names_are_one_line_errors(offline_cache):
    with pytest.raises(CheckpointError, match=rf"timm/{NAME} is not in {offline_cache}.*HF_HUB_OFFLINE.*"
                                              rf"hf download timm/{NAME}") as err:
        upcycle_from_timm(_tiny(), f"timm:{NAME}")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"no pretrained weights named 'vit_smal_patch16_224'.*did you mean"):
        resolve_init_from("timm:vit_smal_patch16_224")
    with pytest.raises(CheckpointError, match="not in"):
        resolve_init_from("hf-hub:someone/absent@v1")
