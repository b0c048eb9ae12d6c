import math

import pytest
import torch

from modsquad.core.errors import UnknownNameError
from modsquad.moe import (
    ROUTERS,
    PerTaskRouter,
    SharedRouter,
    TaskConditionedRouter,
    TaskLevelRouter,
    build_router,
    token_task_ids,
)
from modsquad.moe.routers import shared_task

DIM, EXPERTS, TOP_K, TASKS = 8, 6, 2, 3


def _tokens(seed=0, num=20):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, DIM, generator=gen), torch.randint(0, TASKS, (num,), generator=gen)


def _randomize(router, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return router


ALL_VARIANTS = [("per_task", {}), ("per_task", {"noisy": True}), ("task_conditioned", {}), ("task_level", {}),
                ("task_level", {"mode": "gumbel"}), ("task_level", {"mode": "gumbel_st"}), ("shared", {})]


def test_build_router_names_and_unknown():
    assert set(ROUTERS) == {"per_task", "task_conditioned", "task_level", "shared"}
    classes = {PerTaskRouter, TaskConditionedRouter, TaskLevelRouter, SharedRouter}
    assert {type(build_router(k, DIM, EXPERTS, TOP_K, TASKS)) for k in ROUTERS} == classes
    with pytest.raises(UnknownNameError, match="per_task"):
        build_router("per_taks", DIM, EXPERTS, TOP_K, TASKS)
    with pytest.raises(UnknownNameError):
        build_router("task_level", DIM, EXPERTS, TOP_K, TASKS, mode="hard")
    with pytest.raises(ValueError):
        build_router("shared", DIM, EXPERTS, EXPERTS + 1, TASKS)


@pytest.mark.parametrize("kind", ["per_task", "task_conditioned", "shared"])
def test_zero_init_gives_uniform_probs_and_deterministic_ties(kind):
    router = build_router(kind, DIM, EXPERTS, TOP_K, TASKS)
    x, task_ids = _tokens()
    out = router(x, task_ids)
    torch.testing.assert_close(out.probs, torch.full((20, EXPERTS), 1 / EXPERTS))
    torch.testing.assert_close(out.weights, torch.full((20, TOP_K), 1 / TOP_K))
    assert torch.equal(out.indices, torch.arange(TOP_K).expand(20, TOP_K))  # ties go to the lower id
    assert torch.equal(router(x, task_ids).indices, out.indices)


def test_task_level_starts_near_uniform_with_distinct_choices():
    router = TaskLevelRouter(DIM, 16, 2, 8)
    probs = router(*_tokens()).probs
    assert (probs - 1 / 16).abs().max() < 0.01
    assert len({tuple(r.tolist()) for r in router.eval()(torch.zeros(8, DIM), torch.arange(8)).indices}) > 1


@pytest.mark.parametrize(("kind", "kwargs"), ALL_VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes_dtypes_and_normalised_weights(kind, kwargs, training):
    router = _randomize(build_router(kind, DIM, EXPERTS, TOP_K, TASKS, **kwargs)).train(training)
    x, task_ids = _tokens()
    out = router(x, task_ids)
    assert out.probs.shape == out.logits.shape == (20, EXPERTS)
    assert out.indices.shape == out.weights.shape == (20, TOP_K)
    assert out.indices.dtype == torch.long and out.probs.dtype == torch.float32
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(20))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(20))
    assert (out.indices[:, 0] != out.indices[:, 1]).all()
    chosen = out.logits.gather(1, out.indices)
    assert (chosen[:, :1] >= out.logits).all()  # best first, and it is the best
    if not (kind == "task_level" and kwargs.get("mode") == "gumbel_st"):
        torch.testing.assert_close(out.weights, chosen.softmax(-1))  # renormalised over the chosen k
        renormalised = out.probs.gather(1, out.indices)
        torch.testing.assert_close(out.weights, renormalised / renormalised.sum(-1, keepdim=True))


def test_weights_ignore_experts_never_chosen():
    """Dropping an expert that a token does not choose (extraction) leaves its routing unchanged."""
    router = _randomize(PerTaskRouter(DIM, EXPERTS, TOP_K, TASKS))
    x, task_ids = _tokens(num=3)  # 3 tokens x top-2 leave some of the 6 experts unused
    full = router(x, task_ids)
    keep = sorted(set(full.indices.flatten().tolist()))
    assert len(keep) < EXPERTS
    small = PerTaskRouter(DIM, len(keep), TOP_K, TASKS)
    with torch.no_grad():
        small.weight.copy_(router.weight[:, keep])
    part = small(x, task_ids)
    assert torch.equal(torch.tensor(keep)[part.indices], full.indices)
    torch.testing.assert_close(part.weights, full.weights)
    torch.testing.assert_close(part.logits, full.logits[:, keep])


def test_bfloat16_tokens_route_in_float32():
    router = _randomize(PerTaskRouter(DIM, EXPERTS, TOP_K, TASKS)).to(torch.bfloat16)
    x, task_ids = _tokens()
    out = router(x.to(torch.bfloat16), task_ids)
    assert out.probs.dtype == out.weights.dtype == out.logits.dtype == torch.float32


def test_per_task_router_uses_its_tasks_gate_only():
    router = _randomize(PerTaskRouter(DIM, EXPERTS, TOP_K, TASKS))
    x, task_ids = _tokens()
    torch.testing.assert_close(router(x, task_ids).logits, torch.einsum("td,ted->te", x, router.weight[task_ids]))
    assert router.weight.shape == (TASKS, EXPERTS, DIM) and router.noise_weight is None
    before = router(x, task_ids)
    with torch.no_grad():
        router.weight[1].neg_()
    after = router(x, task_ids)
    keep = task_ids != 1
    assert torch.equal(after.indices[keep], before.indices[keep])
    assert torch.equal(after.weights[keep], before.weights[keep])


@pytest.mark.parametrize("noisy", [False, True])
def test_per_task_router_one_shared_task_computes_its_gate_only(noisy, monkeypatch):
    """A single task id expanded to every token (`token_task_ids` of an int or 0-dim id: a stride-0 view) routes
    as the same id written out per token, from that task's gate rows alone (no all-task matmul)."""
    router = _randomize(PerTaskRouter(DIM, EXPERTS, TOP_K, TASKS, noisy=noisy)).eval()
    x, _ = _tokens()
    shared = token_task_ids(torch.tensor(2), (4, 5))
    assert shared.stride() == (0,) and shared_task(shared).tolist() == [2]
    written = torch.full((20,), 2)
    assert shared_task(written) is None and shared_task(torch.zeros(0, dtype=torch.long)) is None
    ref = router(x, written)
    widths = []
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: widths.append(b.shape[-1]) or torch.matmul(a, b))
    got = router(x, shared)
    assert widths == [EXPERTS]  # one task's E gate columns, not TASKS * E
    torch.testing.assert_close(got.logits, ref.logits)
    assert torch.equal(got.indices, ref.indices)


def test_noisy_gating_only_in_training():
    router = _randomize(PerTaskRouter(DIM, EXPERTS, TOP_K, TASKS, noisy=True))
    assert router.noise_weight.shape == (TASKS, EXPERTS, DIM)
    x, task_ids = _tokens()
    clean = torch.einsum("td,ted->te", x, router.weight[task_ids])
    router.eval()
    torch.testing.assert_close(router(x, task_ids).logits, clean)
    router.train()
    a, b = router(x, task_ids), router(x, task_ids)
    assert not torch.allclose(a.logits, b.logits) and not torch.allclose(a.logits, clean)
    a.logits.sum().backward()
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0


def test_task_conditioned_equals_gate_on_concat():
    router = _randomize(TaskConditionedRouter(DIM, EXPERTS, TOP_K, TASKS, task_dim=5))
    x, task_ids = _tokens()
    concat = torch.cat([x, router.task_embed[task_ids]], dim=1)
    assert router.gate.in_features == DIM + 5
    torch.testing.assert_close(router(x, task_ids).logits, router.gate(concat))


def test_task_conditioned_zero_gate_still_learns():
    router = TaskConditionedRouter(DIM, EXPERTS, TOP_K, TASKS)
    assert router.task_embed.shape == (TASKS, DIM) and router.task_embed.abs().sum() > 0
    x, task_ids = _tokens()
    out = router(x, task_ids)
    (out.probs[:, 0] * (task_ids == 0)).sum().backward()
    assert router.gate.weight.grad[:, DIM:].abs().sum() > 0  # task columns get a gradient at zero init


@pytest.mark.parametrize("mode", ["softmax", "gumbel", "gumbel_st"])
def test_task_level_same_experts_for_all_tokens_of_a_task(mode):
    router = TaskLevelRouter(DIM, EXPERTS, TOP_K, TASKS, mode=mode).train()
    x, task_ids = _tokens()
    for _ in range(3):
        out = router(x, task_ids)
        for t in task_ids.unique():
            rows = task_ids == t
            for field in out:
                assert (field[rows] == field[rows][0]).all()


@pytest.mark.parametrize("mode", ["gumbel", "gumbel_st"])
def test_task_level_gumbel_samples_in_training_and_is_deterministic_in_eval(mode):
    router = TaskLevelRouter(DIM, EXPERTS, TOP_K, TASKS, mode=mode)
    x, task_ids = torch.zeros(TASKS, DIM), torch.arange(TASKS)
    router.eval()
    a, b = router(x, task_ids), router(x, task_ids)
    for fa, fb in zip(a, b, strict=True):
        assert torch.equal(fa, fb)
    assert torch.equal(a.indices, router.task_logits.topk(TOP_K, dim=-1).indices)
    router.train()
    torch.manual_seed(0)
    samples = {tuple(router(x, task_ids).indices[0].sort().values.tolist()) for _ in range(50)}
    assert len(samples) > 1


def test_task_level_gumbel_st_hard_forward_soft_gradient():
    router = TaskLevelRouter(DIM, EXPERTS, 1, TASKS, mode="gumbel_st", tau=0.5).train()
    x, task_ids = torch.zeros(TASKS, DIM), torch.arange(TASKS)
    out = router(x, task_ids)
    torch.testing.assert_close(out.weights, torch.ones(TASKS, 1))
    out.weights.sum().backward()
    assert (router.task_logits.grad != 0).all()  # every expert's logit learns, also with top-1
    router.eval()
    torch.testing.assert_close(router(x, task_ids).weights, torch.ones(TASKS, 1))


def test_task_level_tau_sharpens():
    router = _randomize(TaskLevelRouter(DIM, EXPERTS, TOP_K, TASKS, mode="gumbel", tau=0.1)).train()
    x, task_ids = torch.zeros(TASKS, DIM), torch.arange(TASKS)
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    sharp = entropy(router(x, task_ids).probs)
    router.tau = 10.0
    assert sharp < entropy(router(x, task_ids).probs) < math.log(EXPERTS)


def test_token_task_ids_broadcasting():
    assert torch.equal(token_task_ids(torch.tensor([1, 2]), (2, 3)), torch.tensor([1, 1, 1, 2, 2, 2]))
    assert torch.equal(token_task_ids(2, (2, 3)), torch.full((6,), 2))
    per_token = torch.tensor([[0, 1, 2], [2, 1, 0]])
    assert torch.equal(token_task_ids(per_token, (2, 3)), per_token.flatten())
    with pytest.raises(ValueError, match="task_ids"):
        token_task_ids(torch.tensor([0, 1, 2]), (2, 4))
