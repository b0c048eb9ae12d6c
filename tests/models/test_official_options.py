"""The official Mod-Squad model options on a tiny MultiTaskViT (dim 32, 2 blocks, 32 px)."""

import pytest
import torch

from modsquad.core.errors import ConfigError
from modsquad.models.registry import OFFICIAL

TASKS = ["depth_euclidean", "class_scene"]


def _official(make_vit, **kw):
    return make_vit(TASKS, moe_layout="alternate", dense_attn_head_dim=24, **{**OFFICIAL, **kw})


def test_official_tiny_forward_and_backward(make_vit, randomize, images):
    model = randomize(_official(make_vit))
    assert model.pos_embed.shape[1] == 1 + 16 and model.blocks[1].attn.head_dim == 24
    out = model(images)
    assert out["depth_euclidean"].shape == (2, 1, 32, 32) and out["class_scene"].shape == (2, 365)
    (out["depth_euclidean"].mean() + out["class_scene"].mean() + model.aux_losses()["mi"]).backward()
    assert model.cls_token.grad.abs().sum() > 0 and model.fc_norm.weight.grad.abs().sum() > 0
    out48 = model(torch.randn(1, 3, 48, 48))  # position embedding resampled, class token kept
    assert out48["depth_euclidean"].shape == (1, 1, 48, 48)


def test_classification_pools_unnormed_tokens_through_fc_norm(make_vit, randomize, images):
    model = randomize(_official(make_vit)).eval()
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(x=o))
    with torch.no_grad():
        out = model(images, ["class_scene"])["class_scene"]
        head = model.heads["class_scene"]
        expected = head.fc(head.norm(model.fc_norm(seen["x"][:, 1:].mean(1))))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_task_embedding_every_block_vs_input(make_vit, randomize, images):
    every = randomize(_official(make_vit, depth=1)).eval()
    once = _official(make_vit, depth=1, task_embed="input").eval()
    once.load_state_dict(every.state_dict())
    with torch.no_grad():  # one block: added once either way
        torch.testing.assert_close(every(images)["depth_euclidean"], once(images)["depth_euclidean"])
    deep = randomize(_official(make_vit)).eval()
    deep_once = _official(make_vit, task_embed="input").eval()
    deep_once.load_state_dict(deep.state_dict())
    with torch.no_grad():
        assert not torch.allclose(deep(images)["depth_euclidean"], deep_once(images)["depth_euclidean"])


def test_input_norm_maps_imagenet_inputs_to_minus1_1(make_vit, randomize):
    pm1 = randomize(_official(make_vit)).eval()
    plain = _official(make_vit, input_norm="imagenet").eval()
    plain.load_state_dict(pm1.state_dict())
    raw = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # [0, 1] pixels
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(pm1((raw - mean) / std)["depth_euclidean"], plain(2 * raw - 1)["depth_euclidean"],
                                   rtol=1e-5, atol=1e-5)


def test_mi_reduce_sum_is_layers_times_mean(make_vit, randomize, images):
    model = randomize(_official(make_vit))
    model(images)
    total = model.aux_losses()["mi"]
    model.mi_reduce = "mean"
    torch.testing.assert_close(total, model.aux_losses()["mi"] * len(model.moe_layers()))


@pytest.mark.parametrize("bad", [dict(gate_values="soft"), dict(task_embed="never"), dict(mi_reduce="max"),
                                 dict(moa_bias="none"), dict(input_norm="zscore"), dict(dense_attn_head_dim=0),
                                 dict(attn_kept_experts=[[0]]), dict(mlp_kept_experts=[[3, 1], None])])
def test_bad_option_values_are_config_errors(make_vit, bad):
    with pytest.raises(ConfigError):
        make_vit(TASKS, **bad)
