"""Gate values of the chosen experts (official raw top-k probs vs renormalised) and routers that keep the gate
rows of dropped experts (extraction with raw top-k probs)."""

import pytest
import torch

from modsquad.moe import PROB_EPS, MoEAttention, MoEMlp, build_router

from .reference import (
    GATE_VALUE_OPTIONS,
    MOA_BIAS_OPTIONS,
    ROUTER_CONFIGS,
    ROUTER_IDS,
    assert_layer_matches,
    randomize_experts,
    randomize_router,
    reference_attention,
    reference_mlp,
)

DIM, EXPERTS, TASKS = 8, 5, 3
KEPT = [0, 2, 3]


def _inputs(seed: int, batch: int = 3, tokens: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, DIM, generator=gen, dtype=torch.float64)
    task_ids = torch.randint(0, TASKS, (batch,), generator=gen)
    return x, task_ids, gen


def _mlp(top_k, gen, **kw):
    layer = MoEMlp(DIM, 12, EXPERTS, top_k, TASKS, **kw).double()
    randomize_experts(layer, gen)
    randomize_router(layer.router, gen)
    return layer


def _attn(top_k, gen, **kw):
    layer = MoEAttention(DIM, 4, EXPERTS, top_k, TASKS, **kw).double()
    randomize_experts(layer, gen)
    randomize_router(layer.router, gen)
    return layer


def test_topk_probs_are_raw_softmax_plus_eps():
    router = build_router("per_task", DIM, EXPERTS, 2, TASKS, gate_values="topk_probs", init_std=0.5)
    x, ids = torch.randn(7, DIM), torch.randint(0, TASKS, (7,))
    route = router(x, ids)
    probs = router.gate_logits(x, ids).softmax(-1) + PROB_EPS
    torch.testing.assert_close(route.probs, probs)
    torch.testing.assert_close(route.weights, probs.gather(1, route.indices))
    assert (route.weights.sum(-1) < 1).all()  # not renormalised over the k chosen


@pytest.mark.parametrize("make", [_mlp, _attn], ids=["mlp", "attention"])
@pytest.mark.parametrize("gate_values", GATE_VALUE_OPTIONS)
def test_top1_router_gets_task_loss_gradient_only_with_topk_probs(make, gate_values):
    """With renormalised gates, top_k=1 gives every token weight 1: the router cannot learn from the task loss."""
    x, task_ids, gen = _inputs(0)
    layer = make(1, gen, gate_values=gate_values)
    layer(x, task_ids).square().sum().backward()
    grad = layer.router.weight.grad
    if gate_values == "topk_probs":
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0


@pytest.mark.parametrize("gate_values", GATE_VALUE_OPTIONS)
@pytest.mark.parametrize(("kind", "kwargs", "stochastic"), ROUTER_CONFIGS, ids=ROUTER_IDS)
def test_kept_experts_match_reference(kind, kwargs, stochastic, gate_values):
    x, task_ids, gen = _inputs(1)
    for make, ref, extra in ((_mlp, reference_mlp, {}), (_attn, reference_attention, {"bias": "official"})):
        layer = make(2, gen, router=kind, router_kwargs=kwargs, gate_values=gate_values, kept_experts=KEPT,
                     **extra).train(not stochastic)
        assert layer.num_experts == len(KEPT) and layer.router.num_gate_rows == EXPERTS
        assert layer.usage.shape == (TASKS, len(KEPT))
        assert_layer_matches(layer, ref, x, task_ids, gen)


@pytest.mark.parametrize("bias", MOA_BIAS_OPTIONS)
def test_kept_rows_give_the_full_layers_output_where_winners_are_kept(bias):
    """A layer with only the kept experts but every gate row equals the full layer on tokens whose top-k
    experts are all kept (the softmax denominator and the +1e-4 are unchanged)."""
    x, task_ids, gen = _inputs(2, batch=6, tokens=7)
    x[..., 0] = 1.0
    for full in (_mlp(2, gen, gate_values="topk_probs"), _attn(2, gen, gate_values="topk_probs", bias=bias)):
        with torch.no_grad():  # dropped experts rarely win but still weigh in the softmax denominator
            full.router.weight[:, [1, 4], 0] -= 4.0 if isinstance(full, MoEMlp) else 12.0
        full.eval()
        kw = {"bias": bias} if isinstance(full, MoEAttention) else {}
        cls_args = (DIM, 12) if isinstance(full, MoEMlp) else (DIM, 4)
        sub = type(full)(*cls_args, EXPERTS, 2, TASKS, gate_values="topk_probs", kept_experts=KEPT, **kw).double()
        kept = torch.tensor(KEPT)
        state = {k: (v[kept] if k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "q_weight", "q_bias",
                                      "o_weight") else v)
                 for k, v in full.state_dict().items() if k != "usage"}
        sub.load_state_dict(state, strict=False)
        sub.eval()
        out_full = full(x, task_ids)
        out_sub = sub(x, task_ids)
        chosen = full.last_routing[0].indices.view(x.shape[0], x.shape[1], 2)
        winners_kept = torch.isin(chosen, kept).all(-1)  # [B, N]
        if isinstance(full, MoEAttention):  # attention mixes tokens: compare samples whose every token is kept
            winners_kept = winners_kept.all(-1, keepdim=True).expand_as(winners_kept)
        assert winners_kept.any()
        torch.testing.assert_close(out_sub[winners_kept], out_full[winners_kept], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [_mlp, _attn], ids=["mlp", "attention"])
def test_all_experts_path_with_topk_probs(make):
    x, task_ids, gen = _inputs(3)
    layer = make(2, gen, gate_values="topk_probs").eval()
    assert_layer_matches(layer, lambda m, t, ids: m.forward_all_experts(t, ids), x, task_ids, gen)


def test_bad_options_are_rejected():
    with pytest.raises(Exception, match="gate_values"):
        MoEMlp(DIM, 12, EXPERTS, 2, TASKS, gate_values="softmax")
    with pytest.raises(ValueError, match="kept_experts"):
        MoEMlp(DIM, 12, EXPERTS, 2, TASKS, kept_experts=[3, 1])
    with pytest.raises(ValueError, match="top_k"):
        MoEMlp(DIM, 12, EXPERTS, 2, TASKS, kept_experts=[1])
    with pytest.raises(ValueError, match="bias"):
        MoEAttention(DIM, 4, EXPERTS, 2, TASKS, bias="none")
