"""`MoELayer` self-description: expert parameters, slicing to a task and expert subset, folding fixed routing."""

import pytest
import torch

from modsquad.moe import MoEAttention, MoELayer, MoEMlp

DIM, EXPERTS, TOP_K, TASKS = 32, 6, 2, 3


def _layer(kind: str, router: str = "per_task", gate_values: str = "renormalized") -> MoELayer:
    torch.manual_seed(0)
    if kind == "mlp":
        layer = MoEMlp(DIM, 64, EXPERTS, TOP_K, TASKS, router=router, gate_values=gate_values)
    else:
        layer = MoEAttention(DIM, 16, EXPERTS, TOP_K, TASKS, router=router, gate_values=gate_values)
    with torch.no_grad():  # zero-initialised gates tie everywhere: perturb them so routing is sparse
        for p in layer.router.parameters():
            p.copy_(torch.randn(p.shape))
    return layer.eval()


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_kind_and_expert_parameters(kind):
    layer = _layer(kind)
    assert layer.kind == kind
    params = layer.expert_parameters()
    assert params and all(p.shape[0] == EXPERTS for p in params.values())
    assert set(params) <= set(dict(layer.named_parameters()))
    assert set(layer.task_parameters()) == {"router.weight"}


@pytest.mark.parametrize("gate_values", ["renormalized", "topk_probs"])
@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_slice_matches_the_layer_where_experts_are_kept(kind, gate_values):
    layer = _layer(kind, gate_values=gate_values)
    x = torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(1))
    task = 2
    with torch.no_grad():
        full = layer(x, torch.full((2,), task))
        chosen = layer.last_routing[0].indices
        kept = sorted({0, *chosen[0].tolist(), *chosen[1].tolist()})
        small = layer.slice(task, kept)
        out = small(x, torch.zeros(2, dtype=torch.long))
    assert (small.num_tasks, small.num_experts, small.usage.shape) == (1, len(kept), (1, len(kept)))
    assert all(p.shape[0] == len(kept) for p in small.expert_parameters().values())
    inside = torch.isin(chosen, torch.tensor(kept)).all(1).view(2, 8)
    assert inside.any()
    torch.testing.assert_close(out[inside], full[inside], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_fold_of_fixed_routing_equals_the_layer(kind):
    layer = _layer(kind, router="task_level")
    idx, _ = layer.router.fixed_choice(1)
    small = layer.slice(1, sorted(idx.tolist()))
    dense = small.fold()
    assert not isinstance(dense, MoELayer)
    x = torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x, torch.full((2,), 1)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fixed routing"):
        _layer(kind).slice(0, [0, 1]).fold()


@pytest.mark.parametrize("index_add", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_an_empty_batch_passes_through_both_ways(kind, index_add, monkeypatch):
    """Zero images (an empty last batch, an ONNX/torch call with batch 0) give an empty output and gradient, with
    the CPU's index_add sums and with the un-sort-and-sum path GPUs and torch.compile take."""
    import modsquad.moe.dispatch as dispatch

    if not index_add:
        monkeypatch.setattr(dispatch, "INDEX_ADD_DEVICES", set())

    layer = (MoEMlp(16, 64, 4, 2, 3) if kind == "mlp"
             else MoEAttention(16, 8, 4, 2, 3))
    x = torch.zeros(0, 5, 16, requires_grad=True)
    out = layer(x, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 5, 16)
    out.sum().backward()  # runs; the (empty) input gradient may be left as None
    assert x.grad is None or x.grad.shape == x.shape
