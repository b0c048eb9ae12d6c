"""torch.compile of the MoE layers and the model: one graph (fullgraph=True), same outputs and gradients as eager.

The tests use the `aot_eager` backend: it runs dynamo, the fake kernels and AOT autograd (everything that can
break a graph or get a shape wrong) without a C++ build; the inductor test is opt-in (slow on 2 CPU cores).
"""

import os

import pytest
import torch
import torch._dynamo

from modsquad.models import MultiTaskViT
from modsquad.moe import MoEAttention, MoEMlp
from modsquad.moe.dispatch import _grouped_mm_op, _grouped_mm_weight_grad_op, plan_dispatch

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomize(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random values for every parameter (gates included, so tokens spread over the experts)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)
    return module


def _run(module, x, task_ids):
    """Output and the gradients of (input, every parameter) of sum(out^2)."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x, task_ids)
    out.float().square().sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _assert_close_lists(got, expected, **tol):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_compiles_fullgraph_and_matches_eager(kind, dtype):
    layer = MoEMlp(32, 128, 4, 2, num_tasks=2) if kind == "mlp" else MoEAttention(32, 16, 4, 2, num_tasks=2)
    layer = _randomize(layer).to(dtype)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    task_ids = torch.tensor([0, 1])
    eager_out, eager_grads = _run(layer, x, task_ids)
    eager_usage = layer.usage.clone()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out, grads = _run(compiled, x, task_ids)
    torch.testing.assert_close(out, eager_out, **TOL[dtype])
    _assert_close_lists(grads, eager_grads, **TOL[dtype])
    assert torch.equal(layer.usage, 2 * eager_usage)  # usage counting still runs inside the graph
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, task_ids), eager_out, **TOL[dtype])


def test_whole_model_compiles_fullgraph_and_matches_eager():
    model = _randomize(MultiTaskViT(tasks=["depth_euclidean", "normal"], img_size=32, patch_size=8, embed_dim=32,
                                    depth=2, num_heads=2, mlp_ratio=2.0, router="per_task", moe_layout="both",
                                    attn_experts=4, attn_top_k=2, attn_head_dim=16, mlp_experts=4, mlp_top_k=2))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def step(m):
        model.zero_grad(set_to_none=True)
        preds = m(images)
        aux = model.aux_losses()
        loss = sum(p.square().mean() for p in preds.values()) + sum(aux.values())
        loss.backward()
        return preds, aux, [p.grad for p in model.parameters()]

    eager_preds, eager_aux, eager_grads = step(model)
    preds, aux, grads = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    for task in eager_preds:
        torch.testing.assert_close(preds[task], eager_preds[task], **TOL[torch.float32])
    for name in eager_aux:
        torch.testing.assert_close(aux[name], eager_aux[name], **TOL[torch.float32])
    _assert_close_lists(grads, eager_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("env", ["0", "1"])
def test_grouped_mm_custom_ops_pass_opcheck(env, monkeypatch):
    """Fake kernels, schema and the registered backward of the custom ops agree with their real kernels, for
    the loop and (where supported) grouped_mm, with an expert that gets no rows."""
    monkeypatch.setenv("MODSQUAD_GROUPED_MM", env)
    gen = torch.Generator().manual_seed(3)
    plan = plan_dispatch(torch.tensor([[2, 0], [0, 3], [2, 3], [3, 0]]), num_experts=4)  # expert 1 empty
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    w = torch.randn(4, 16, 8, generator=gen, requires_grad=True)
    torch.library.opcheck(_grouped_mm_op, (x, w, plan.offsets))
    torch.library.opcheck(_grouped_mm_weight_grad_op, (x.detach(), torch.randn(8, 8, generator=gen), plan.offsets))
    out = _grouped_mm_op(x, w, plan.offsets)
    reference = torch.einsum("sd,sdo->so", x, w[plan.expert_index])
    torch.testing.assert_close(out, reference)
    g = torch.randn(8, 8, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(reference, (x, w), g), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MODSQUAD_INDUCTOR_TESTS") != "1",
                    reason="inductor builds C++ kernels (about a minute on 2 cores); set MODSQUAD_INDUCTOR_TESTS=1")
def test_mlp_compiles_with_inductor():
    layer = _randomize(MoEMlp(32, 128, 4, 2, num_tasks=2))
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    task_ids = torch.tensor([0, 1])
    eager_out, eager_grads = _run(layer, x, task_ids)
    out, grads = _run(torch.compile(layer, fullgraph=True), x, task_ids)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    _assert_close_lists(grads, eager_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # renders a synthetic suite and trains: about 15 s
def test_train_compile_option_trains_through_torch_compile(tmp_path, monkeypatch):
    """`train.compile: true` runs the training forward through torch.compile (aot_eager here, to stay fast) and
    still writes checkpoints with the model's own parameter names."""
    from safetensors import safe_open

    from modsquad.config import config_from_dict
    from modsquad.train.trainer import train

    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(module, **kwargs):
        compiled.append(type(module).__name__)
        return real_compile(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    cfg = config_from_dict({
        "model": {"name": "modsquad_vit_tiny", "tasks": ["depth_euclidean", "normal"], "img_size": 32,
                  "overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "attn_head_dim": 16,
                                "mlp_expert_hidden": 32, "attn_experts": 4, "mlp_experts": 4}},
        "data": {"format": "synthetic", "root": str(tmp_path / "data"), "batch_size": 4, "workers": 0,
                 "synth": {"images": 16, "size": 32, "seed": 0}},
        "train": {"steps": 2, "lr": 1e-3, "log_every": 1, "device": "cpu", "compile": True},
        "aux": {"mi": 0.005},
        "output": {"visualize": 0},
    })
    train(cfg, tmp_path / "run", progress=False)
    assert compiled == ["MultiTaskViT"]
    with safe_open(str(tmp_path / "run" / "last.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
