import pytest
import torch
import torch.nn.functional as F

from modsquad.moe import dispatch
from modsquad.moe.dispatch import (
    combine,
    gather_tokens,
    grouped_matmul,
    grouped_mm_supported,
    plan_dispatch,
    sort_rows,
    sum_by_token,
    unsort_rows,
)

INDICES = torch.tensor([[2, 0], [0, 3], [2, 3], [3, 0]])  # 4 tokens, top-2, expert 1 gets nothing


def _per_row(x_sorted, weight, plan, bias=None):
    """Definition: row s is multiplied by the weight of its expert."""
    out = torch.einsum("sd,sdo->so", x_sorted, weight[plan.expert_index])
    return out if bias is None else out + bias[plan.expert_index]


def test_plan_sorts_stably_by_expert():
    plan = plan_dispatch(INDICES, num_experts=5)
    assert plan.expert_index.tolist() == [0, 0, 0, 2, 2, 3, 3, 3]
    assert plan.order.tolist() == [1, 2, 7, 0, 4, 3, 5, 6]  # token order kept within an expert
    assert plan.token_index.tolist() == [0, 1, 3, 0, 2, 1, 2, 3]
    assert torch.equal(plan.inverse[plan.order], torch.arange(8)) and torch.equal(plan.order[plan.inverse], torch.arange(8))
    assert plan.counts.tolist() == [3, 0, 2, 3, 0] and plan.splits == [3, 0, 2, 3, 0]
    assert plan.offsets.tolist() == [3, 3, 5, 8, 8] and plan.offsets.dtype == torch.int32
    assert (plan.num_tokens, plan.top_k, plan.num_experts) == (4, 2, 5)


@pytest.mark.parametrize("index_add", [True, False])
def test_gather_sort_unsort_roundtrip_and_gradients(index_add, monkeypatch):
    """Row moves and their hand-written backwards (the gather's: index_add on CPUs, un-sort + sum elsewhere)."""
    if not index_add:
        monkeypatch.setattr(dispatch, "INDEX_ADD_DEVICES", set())
    plan = plan_dispatch(INDICES, num_experts=4)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gathered = gather_tokens(x, plan)
    assert torch.equal(gathered, x[plan.token_index])
    rows = torch.randn(8, 3, dtype=torch.float64)
    assert torch.equal(sort_rows(rows, plan), rows[plan.order])
    assert torch.equal(unsort_rows(sort_rows(rows, plan), plan), rows)
    assert torch.equal(unsort_rows(gathered, plan), x.repeat_interleave(2, dim=0))
    g = torch.randn(8, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gathered, x, g)
    torch.testing.assert_close(grad, torch.zeros(4, 3, dtype=torch.float64).index_add(0, plan.token_index, g))
    torch.autograd.gradcheck(lambda r: unsort_rows(sort_rows(r, plan) * 2.0, plan), rows.requires_grad_())


def test_combine_weighted_sum_of_slots():
    plan = plan_dispatch(INDICES, num_experts=4)
    y_flat = torch.randn(8, 3, dtype=torch.float64)  # (token, slot) order
    weights = torch.rand(4, 2, dtype=torch.float64)
    expected = weights[:, :1] * y_flat[0::2] + weights[:, 1:] * y_flat[1::2]
    torch.testing.assert_close(combine(sort_rows(y_flat, plan), weights, plan), expected)


@pytest.mark.parametrize("index_add", [True, False])
def test_sum_by_token_equals_combine_and_its_gradient(index_add, monkeypatch):
    """Rows scaled by their gate weights and summed by `sum_by_token` (index_add on CPUs, un-sort + sum elsewhere)
    give `combine`'s weighted sums, with the same gradients."""
    if not index_add:
        monkeypatch.setattr(dispatch, "INDEX_ADD_DEVICES", set())
    gen = torch.Generator().manual_seed(3)
    plan = plan_dispatch(INDICES, num_experts=4)
    y = torch.randn(8, 3, dtype=torch.float64, generator=gen, requires_grad=True)  # sorted by expert
    weights = torch.rand(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    got = sum_by_token(y * weights.reshape(-1, 1)[plan.order], plan)
    ref = combine(y, weights, plan)
    torch.testing.assert_close(got, ref)
    g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    for a, r in zip(torch.autograd.grad(got, (y, weights), g), torch.autograd.grad(ref, (y, weights), g), strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_matmul_loop_float64_with_empty_experts(bias):
    gen = torch.Generator().manual_seed(0)
    plan = plan_dispatch(INDICES, num_experts=5)
    x = torch.randn(8, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    out = grouped_matmul(x, w, plan, b)
    ref = _per_row(x, w, plan, b)
    torch.testing.assert_close(out, ref)
    params = [x, w] + ([b] if bias else [])
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    for a, r in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, r)
    assert w.grad is None
    grads = torch.autograd.grad(grouped_matmul(x, w, plan).sum(), w)[0]
    assert grads[1].abs().sum() == 0 and grads[4].abs().sum() == 0  # experts without rows


def test_probe_cached_and_float64_unsupported_on_cpu():
    assert grouped_mm_supported("cpu", torch.float64) is False
    assert ("cpu", torch.float64) in dispatch._GROUPED_MM_SUPPORT


def _spy_grouped_mm(monkeypatch):
    calls = []
    real = F.grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


@pytest.mark.skipif(not grouped_mm_supported("cpu", torch.float32), reason="no grouped_mm for float32 on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_matches_loop(dtype, monkeypatch):
    if not grouped_mm_supported("cpu", dtype):
        pytest.skip(f"no grouped_mm for {dtype}")
    calls = _spy_grouped_mm(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    plan = plan_dispatch(torch.randint(0, 6, (40, 2), generator=gen), num_experts=6)
    x = torch.randn(80, 16, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(6, 16, 8, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(6, 8, generator=gen).to(dtype).requires_grad_()
    out = grouped_matmul(x, w, plan, b)
    assert len(calls) == 1
    out.sum().backward()  # an expanded (stride-0) gradient must work too
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = grouped_matmul(x, w, plan, b, use_grouped_mm=False)
    ref.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out, ref, **tol)
    for g, t in zip(grads, (x, w, b), strict=True):
        torch.testing.assert_close(g, t.grad, **tol)


@pytest.mark.parametrize(("env", "dims", "expected_calls"), [("0", (16, 8), 0), ("1", (16, 6), 0), ("1", (16, 8), 1)])
def test_grouped_mm_selection(env, dims, expected_calls, monkeypatch):
    """MODSQUAD_GROUPED_MM=0 forces the loop; unaligned widths (6 floats = 24 bytes) fall back to it too."""
    if expected_calls and not grouped_mm_supported("cpu", torch.float32):
        pytest.skip("no grouped_mm for float32 on CPU")
    monkeypatch.setenv("MODSQUAD_GROUPED_MM", env)
    calls = _spy_grouped_mm(monkeypatch)
    plan = plan_dispatch(INDICES, num_experts=4)
    x, w = torch.randn(8, dims[0]), torch.randn(4, *dims)
    torch.testing.assert_close(grouped_matmul(x, w, plan), _per_row(x, w, plan))
    assert len(calls) == expected_calls


@pytest.mark.parametrize("kind", ["gathered", "slices"])
def test_expert_bias_add_and_its_gradient(kind):
    """_AddExpertBias (gathered bias rows, one-hot matmul backward; GPUs) and _AddExpertBiasSlices (one add per
    expert slice, slice sums backward; CPUs) equal out + bias[expert] and its autograd, experts without rows too."""
    gen = torch.Generator().manual_seed(2)
    plan = plan_dispatch(INDICES, num_experts=5)
    assert 0 in plan.splits  # an expert without rows
    out = torch.randn(8, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    if kind == "gathered":
        y = dispatch._AddExpertBias.apply(out.clone(), bias, plan.expert_one_hot(torch.float64), plan.expert_index)
    else:
        y = dispatch._AddExpertBiasSlices.apply(out.clone(), bias, plan.splits)
    ref = out + bias[plan.expert_index]
    torch.testing.assert_close(y, ref)
    g = torch.randn(8, 4, dtype=torch.float64, generator=gen)
    for a, r in zip(torch.autograd.grad(y, (out, bias), g), torch.autograd.grad(ref, (out, bias), g), strict=True):
        torch.testing.assert_close(a, r)


def test_probe_under_inference_mode_is_not_cached_as_unsupported(monkeypatch):
    """A process whose first MoE forward runs under inference_mode must still get grouped_mm afterwards."""
    from modsquad.moe import dispatch

    monkeypatch.setattr(dispatch, "_GROUPED_MM_SUPPORT", {})
    expected = dispatch._probe_grouped_mm(torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        assert dispatch.grouped_mm_supported("cpu", torch.float32) == expected


@pytest.mark.parametrize("faster", ["grouped_mm", "loop"])
def test_auto_mode_times_once_per_bucket_and_matches_both_paths(faster, monkeypatch):
    """MODSQUAD_GROUPED_MM=auto: one timing per (device, dtype, rows bucket, weight shape), cached; either choice
    gives the same results (forward and gradients) to float rounding as both fixed paths."""
    if not grouped_mm_supported("cpu", torch.float32):
        pytest.skip("no grouped_mm for float32 on CPU")
    monkeypatch.setenv("MODSQUAD_GROUPED_MM", "auto")
    monkeypatch.setattr(dispatch, "_AUTO_CHOICE", {})
    timings = []

    def fake_time(fn, repeats=3):  # makes the outcome deterministic: `faster` wins
        timings.append(fn.__name__)
        return 1.0 if fn.__name__ == faster else 2.0

    monkeypatch.setattr(dispatch, "_time_min", fake_time)
    gen = torch.Generator().manual_seed(4)
    plan = plan_dispatch(torch.randint(0, 6, (40, 2), generator=gen), num_experts=6)
    x = torch.randn(80, 16, generator=gen).requires_grad_()
    w = torch.randn(6, 16, 8, generator=gen).requires_grad_()
    b = torch.randn(6, 8, generator=gen).requires_grad_()
    results = {}
    for name, use in (("auto", None), ("grouped_mm", True), ("loop", False)):
        out = grouped_matmul(x, w, plan, b, use_grouped_mm=use)
        grads = torch.autograd.grad((out * out).sum(), (x, w, b))
        results[name] = (out, *grads)
    grouped_matmul(x[:70], w, plan_dispatch(torch.randint(0, 6, (35, 2), generator=gen), 6), b)  # same bucket
    assert sorted(timings) == ["grouped", "loop"]  # timed once
    assert dispatch.auto_choices() == {("cpu", torch.float32, 128, 6, 16, 8): faster}
    for name in ("grouped_mm", "loop"):
        for got, ref in zip(results["auto"], results[name], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
