import pytest
import torch

from modsquad.moe import MoEMlp, count_selections

from .reference import (
    GATE_VALUE_OPTIONS,
    ROUTER_CONFIGS,
    ROUTER_IDS,
    assert_layer_matches,
    randomize_experts,
    randomize_router,
    reference_mlp,
)

DIM, HIDDEN, EXPERTS, TOP_K, TASKS = 8, 12, 4, 2, 3


def _inputs(seed: int, dtype=torch.float64, batch: int = 3, tokens: int = 5, dim: int = DIM):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=gen, dtype=dtype)
    x[..., 0] = 1.0  # lets randomize_router(never=...) shut one expert out
    task_ids = torch.randint(0, TASKS, (batch,), generator=gen)
    return x, task_ids, gen


def _layer(kind, kwargs, gen, never=None, dtype=torch.float64, dim=DIM, hidden=HIDDEN, **extra):
    layer = MoEMlp(dim, hidden, EXPERTS, TOP_K, TASKS, router=kind, router_kwargs=kwargs, **extra).to(dtype)
    randomize_experts(layer, gen)
    randomize_router(layer.router, gen, never=never)
    return layer


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("never", [None, EXPERTS - 1], ids=["all-experts", "idle-expert"])
@pytest.mark.parametrize("gate_values", GATE_VALUE_OPTIONS)
@pytest.mark.parametrize(("kind", "kwargs", "stochastic"), ROUTER_CONFIGS, ids=ROUTER_IDS)
def test_matches_reference_float64(kind, kwargs, stochastic, gate_values, never, seed):
    x, task_ids, gen = _inputs(seed)
    layer = _layer(kind, kwargs, gen, never=never, gate_values=gate_values).train(not stochastic)
    assert_layer_matches(layer, reference_mlp, x, task_ids, gen)
    if never is not None:
        assert layer.usage[:, never].sum() == 0 and layer.usage.sum() == x.shape[0] * x.shape[1] * TOP_K


@pytest.mark.parametrize(("kind", "kwargs", "stochastic"), ROUTER_CONFIGS, ids=ROUTER_IDS)
def test_grouped_mm_matches_loop_float32(kind, kwargs, stochastic, monkeypatch):
    x, task_ids, gen = _inputs(0, dtype=torch.float32, batch=4, tokens=16, dim=16)
    layer = _layer(kind, kwargs, gen, never=1, dtype=torch.float32, dim=16, hidden=64).eval()
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MODSQUAD_GROUPED_MM", flag)
        xg = x.clone().requires_grad_()
        out = layer(xg, task_ids)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, [p.grad.clone() for p in layer.parameters() if p.grad is not None]))
        layer.zero_grad(set_to_none=True)
    (out_g, gx_g, gp_g), (out_l, gx_l, gp_l) = results
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp_g, gp_l, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "kwargs", "stochastic"), ROUTER_CONFIGS, ids=ROUTER_IDS)
def test_mixed_tasks_equal_per_task_forwards(kind, kwargs, stochastic):
    x, _, gen = _inputs(1, batch=6)
    task_ids = torch.tensor([2, 0, 1, 0, 2, 2])
    layer = _layer(kind, kwargs, gen).eval()
    together = layer(x, task_ids)
    for t in range(TASKS):
        rows = task_ids == t
        torch.testing.assert_close(together[rows], layer(x[rows], t), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kind", "param"), [("per_task", "weight"), ("task_conditioned", "task_embed"),
                                             ("task_level", "task_logits")])
def test_changing_one_tasks_gate_leaves_other_tasks_alone(kind, param):
    x, _, gen = _inputs(2, batch=4)
    task_ids = torch.tensor([0, 1, 0, 1])
    layer = _layer(kind, {}, gen).eval()
    before = layer(x, task_ids)
    with torch.no_grad():
        getattr(layer.router, param)[1].mul_(-3.0).add_(1.0)
    after = layer(x, task_ids)
    torch.testing.assert_close(after[task_ids == 0], before[task_ids == 0], rtol=0, atol=0)
    assert not torch.allclose(after[task_ids == 1], before[task_ids == 1])


def test_usage_counts_routing_and_persists():
    x, task_ids, gen = _inputs(3)
    layer = _layer("per_task", {}, gen)
    layer(x, task_ids)
    routing, token_tasks = layer.last_routing
    first = count_selections(routing.indices, token_tasks, TASKS, EXPERTS)
    assert torch.equal(layer.usage, first)
    assert layer.usage.dtype == torch.long and layer.usage.sum() == x.shape[0] * x.shape[1] * TOP_K
    with torch.inference_mode():
        layer(x, task_ids)
    assert torch.equal(layer.usage, 2 * first)
    assert torch.equal(layer.state_dict()["usage"], 2 * first)
    assert torch.equal(layer.to(torch.bfloat16).usage, 2 * first)  # int64: never rounded by .to(dtype)
    layer.reset_usage()
    assert layer.usage.sum() == 0
    layer.track_usage = False
    layer(x.to(torch.bfloat16), task_ids)
    assert layer.usage.sum() == 0


def test_accepts_token_rows_and_per_token_task_ids():
    x, task_ids, gen = _inputs(4)
    layer = _layer("per_task", {}, gen)
    flat = layer(x.reshape(-1, DIM), task_ids.repeat_interleave(x.shape[1]))
    torch.testing.assert_close(flat.view_as(x), layer(x, task_ids))


def test_attributes_and_expert_layout():
    layer = MoEMlp(16, 64, 8, 2, 3, router="shared")
    assert (layer.num_experts, layer.top_k, layer.num_tasks, layer.router_kind) == (8, 2, 3, "shared")
    assert layer.expert_hidden == 32
    assert layer.fc1.weight.shape == (8, 16, 32) and layer.fc2.weight.shape == (8, 32, 16)
    assert MoEMlp(16, 64, 8, 2, 3, expert_hidden=16).fc1.weight.shape == (8, 16, 16)


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_bfloat16(mode):
    x, task_ids, gen = _inputs(5, dtype=torch.float32, batch=2, tokens=8, dim=16)
    layer = _layer("per_task", {}, gen, dtype=torch.float32, dim=16, hidden=64)
    ref = layer(x, task_ids)
    if mode == "bf16":
        out = layer.to(torch.bfloat16)(x.to(torch.bfloat16), task_ids)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, task_ids)
    assert out.dtype == torch.bfloat16
    assert layer.last_routing[0].probs.dtype == torch.float32
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.3)


@pytest.mark.parametrize(("kind", "kwargs", "stochastic"), ROUTER_CONFIGS, ids=ROUTER_IDS)
def test_all_experts_path_matches_dispatch(kind, kwargs, stochastic):
    x, task_ids, gen = _inputs(6)
    layer = _layer(kind, kwargs, gen, never=EXPERTS - 1).eval()
    assert_layer_matches(layer, lambda m, t, ids: m.forward_all_experts(t, ids), x, task_ids, gen)


def test_onnx_export_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    x, task_ids, gen = _inputs(7, dtype=torch.float32, dim=16)
    layer = _layer("per_task", {}, gen, dtype=torch.float32, dim=16, hidden=32).eval()
    path = tmp_path / "moe_mlp.onnx"
    torch.onnx.export(layer, (x, task_ids), str(path), input_names=["tokens", "task_ids"], dynamo=False,
                      dynamic_axes={"tokens": {0: "batch"}, "task_ids": {0: "batch"}})
    assert layer.usage.sum() == 0  # no usage counting while exporting
    x2 = torch.randn(5, 5, 16, generator=gen)
    x2[..., 0] = 1.0
    ids2 = torch.tensor([0, 2, 1, 1, 0])
    (out,) = ort.InferenceSession(str(path)).run(None, {"tokens": x2.numpy(), "task_ids": ids2.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), layer(x2, ids2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kind", "kwargs", "stochastic"), ROUTER_CONFIGS, ids=ROUTER_IDS)
def test_as_many_experts_as_top_k_matches_reference(kind, kwargs, stochastic):
    """E == k (a task extracted down to top-k experts) takes the dispatch-free path; same maths."""
    x, task_ids, gen = _inputs(3)
    layer = MoEMlp(DIM, HIDDEN, TOP_K, TOP_K, TASKS, router=kind, router_kwargs=kwargs).double()
    randomize_experts(layer, gen)
    randomize_router(layer.router, gen)
    layer.train(not stochastic)
    assert layer.runs_all_experts()
    assert_layer_matches(layer, reference_mlp, x, task_ids, gen)
    assert layer.usage.sum() == x.shape[0] * x.shape[1] * TOP_K
