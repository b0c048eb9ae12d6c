import json

import pytest
import torch

from modsquad.core.errors import ConfigError, UnknownNameError
from modsquad.models import MultiTaskViT, build_model_from_config, moe_placement
from modsquad.moe import MoEAttention, MoEMlp

IMG, TOKENS = 32, 16
ROUTER_CASES = [
    ("dense", None),
    ("per_task", None),
    ("per_task", {"noisy": True}),
    ("task_conditioned", None),
    ("task_level", None),
    ("task_level", {"mode": "gumbel"}),
    ("shared", None),
]


def _expected_shape(task, batch):
    return {"depth_euclidean": (batch, 1, IMG, IMG), "normal": (batch, 3, IMG, IMG),
            "segment_semantic": (batch, 18, IMG, IMG), "class_scene": (batch, 365)}[task]


@pytest.mark.parametrize("head", ["linear", "conv"])
@pytest.mark.parametrize("router,router_kwargs", ROUTER_CASES)
def test_output_shapes(make_vit, images, router, router_kwargs, head):
    model = make_vit(router=router, router_kwargs=router_kwargs, head=head).train()
    out = model(images)
    assert list(out) == model.tasks
    for task, y in out.items():
        assert y.shape == _expected_shape(task, len(images))
        assert torch.isfinite(y).all()
    sub = model(images, tasks=["class_scene", "normal"])
    assert list(sub) == ["class_scene", "normal"]


@pytest.mark.parametrize("router", ["dense", "per_task", "task_conditioned", "task_level", "shared"])
def test_multi_task_forward_equals_single_task_forwards(make_vit, randomize, images, router):
    model = randomize(make_vit(router=router).double()).eval()
    x = images.double()
    joint = model(x)
    for task in model.tasks:
        alone = model(x, tasks=[task])[task]
        torch.testing.assert_close(joint[task], alone, rtol=1e-10, atol=1e-10)


def test_moe_placement_layouts():
    assert moe_placement(4, 1, "alternate") == [(True, False), (False, True), (True, False), (False, True)]
    assert moe_placement(4, 1, "both") == [(True, True)] * 4
    assert moe_placement(4, 2, "both") == [(False, False), (True, True), (False, False), (True, True)]
    assert moe_placement(6, 2, "alternate") == [(False, False), (True, False), (False, False), (False, True),
                                                (False, False), (True, False)]
    assert moe_placement(2, 1, "mlp") == [(False, True)] * 2


def test_layer_names_and_types(make_vit):
    model = make_vit(depth=4, moe_layout="alternate")
    layers = model.moe_layers()
    assert [n for n, _ in layers] == ["blocks.0.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.3.mlp"]
    assert [type(m) for _, m in layers] == [MoEAttention, MoEMlp, MoEAttention, MoEMlp]
    assert make_vit(router="dense").moe_layers() == []


def test_per_layer_expert_counts(make_vit, images):
    model = make_vit(depth=2, attn_experts=[3, 6], attn_top_k=[1, 3], mlp_experts=[5, 2], mlp_top_k=2)
    got = {n: (m.num_experts, m.top_k) for n, m in model.moe_layers()}
    assert got == {"blocks.0.attn": (3, 1), "blocks.0.mlp": (5, 2), "blocks.1.attn": (6, 3), "blocks.1.mlp": (2, 2)}
    out = model(images)
    assert out["normal"].shape == (2, 3, IMG, IMG)
    usage = model.expert_usage()["normal"]
    assert [len(usage[n]) for n in got] == [3, 5, 6, 2]


def test_bad_expert_lists(make_vit):
    with pytest.raises(ConfigError, match="attn_experts has 3 entries but the model has 2"):
        make_vit(attn_experts=[4, 4, 4])
    with pytest.raises(ConfigError, match="mlp_top_k"):
        make_vit(mlp_experts=[4, 1])
    with pytest.raises(ConfigError, match="router"):
        make_vit(router="per_head")
    with pytest.raises(ConfigError, match="moe_layout"):
        make_vit(moe_layout="every")
    with pytest.raises(ConfigError, match="aux_losses"):
        make_vit(aux_losses={"entropy": True})
    with pytest.raises(ConfigError, match="task_prior"):
        make_vit(aux_losses={"task_prior": "zipf"})
    with pytest.raises(ConfigError, match="router_kwargs"):
        make_vit(router_kwargs={"nosy": True})
    with pytest.raises(UnknownNameError, match="unknown task"):
        make_vit(tasks=["depth"])


def test_aux_losses(make_vit, images):
    model = make_vit()
    model(images)
    losses = model.aux_losses()
    assert set(losses) == {"mi", "balance", "z"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    only_mi = make_vit(aux_losses={"balance": False, "z": False})
    only_mi(images)
    assert set(only_mi.aux_losses()) == {"mi"}
    dense = make_vit(router="dense")
    dense(images)
    assert dense.aux_losses() == {}


def test_expert_usage_counts(make_vit, randomize, images):
    model = randomize(make_vit())
    model(images)
    model.reset_usage()
    model(images, tasks=["normal", "class_scene"])
    usage = model.expert_usage()
    assert set(usage) == set(model.tasks)
    for task, per_layer in usage.items():
        assert list(per_layer) == [n for n, _ in model.moe_layers()]
        for name, counts in per_layer.items():
            k = model.get_submodule(name).top_k
            ran = task in ("normal", "class_scene")
            assert sum(counts) == (len(images) * TOKENS * k if ran else 0)
            assert all(isinstance(c, int) for c in counts)
    model.reset_usage()
    assert all(sum(c) == 0 for per_layer in model.expert_usage().values() for c in per_layer.values())


@pytest.mark.parametrize("router,router_kwargs", [("per_task", None), ("per_task", {"noisy": True}),
                                                  ("task_conditioned", None), ("task_level", {"mode": "gumbel_st"}),
                                                  ("dense", None)])
def test_gradients_reach_every_parameter(make_vit, randomize, images, router, router_kwargs):
    model = randomize(make_vit(router=router, router_kwargs=router_kwargs, head="conv", drop_path_rate=0.1)).train()
    torch.manual_seed(0)
    out = model(images)
    loss = sum(y.square().mean() for y in out.values()) + sum(model.aux_losses().values())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_dense_model_runs_encoder_once(make_vit, images):
    model = make_vit(router="dense")
    assert model.task_embed is None and not model.task_dependent
    assert model.config["use_task_embed"] is False
    conditioned = make_vit(router="dense", use_task_embed=True)
    assert conditioned.task_dependent and conditioned.task_embed.shape == (4, 32)
    assert conditioned(images)["normal"].shape == (2, 3, IMG, IMG)


def test_other_image_sizes_resample_pos_embed(make_vit):
    model = make_vit().eval()
    out = model(torch.randn(1, 3, 48, 24))
    assert out["normal"].shape == (1, 3, 48, 24)
    assert out["class_scene"].shape == (1, 365)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(UnknownNameError, match="model has no task 'edge'"):
        model(torch.randn(1, 3, 32, 32), tasks=["edge"])


def test_grad_checkpointing_matches_and_counts_usage_once(make_vit, randomize, images):
    model = randomize(make_vit().double())
    x = images.double()
    ref = model(x)
    sum(y.sum() for y in ref.values()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.reset_usage()
    model.set_grad_checkpointing(True)
    out = model(x)
    sum(y.sum() for y in out.values()).backward()
    for task in ref:
        torch.testing.assert_close(out[task], ref[task])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)
    counts = model.expert_usage()["normal"]["blocks.0.mlp"]
    assert sum(counts) == len(images) * TOKENS * 2


def test_no_weight_decay(make_vit):
    names = make_vit().no_weight_decay()
    assert {"pos_embed", "task_embed", "norm.weight", "blocks.0.norm1.bias", "blocks.0.mlp.fc1.bias",
            "blocks.0.attn.o_bias"} <= names
    assert "blocks.0.attn.q_weight" not in names and "blocks.0.mlp.fc1.weight" not in names
    assert names <= {n for n, _ in make_vit().named_parameters()}


def test_config_rebuilds_identical_model(make_vit, images):
    model = make_vit(attn_experts=[3, 5], img_size=(32, 32), router_kwargs={"noisy": True}).eval()
    cfg = json.loads(json.dumps(model.config))
    assert cfg == model.config
    twin = build_model_from_config(cfg).eval()
    assert twin.config == model.config
    twin.load_state_dict(model.state_dict())
    for task, y in model(images).items():
        torch.testing.assert_close(twin(images)[task], y, rtol=0, atol=0)


def test_constructor_args_recorded(make_vit):
    import inspect

    params = set(inspect.signature(MultiTaskViT.__init__).parameters) - {"self"}
    assert set(make_vit().config) == params | {"name"}
