import pytest
import torch

from modsquad.core.errors import ConfigError
from modsquad.extract.export import extract_model
from modsquad.extract.prune import check_selection, count_params, select_experts, select_layer_experts
from modsquad.extract.usage import count_usage
from modsquad.moe import MoEAttention, MoEMlp

from .conftest import ROUTER_KINDS


def test_default_keeps_every_used_expert():
    assert select_layer_experts([0, 5, 0, 1, 2, 0], top_k=2) == [1, 3, 4]
    assert select_layer_experts([0, 5, 0, 1, 2, 0], top_k=2, threshold=0.0) == [1, 3, 4]


def test_never_fewer_than_top_k():
    assert select_layer_experts([0, 7, 0, 0], top_k=2) == [0, 1]  # the unused fill-up goes to the lowest id
    assert select_layer_experts([0, 0, 0, 0], top_k=3) == [0, 1, 2]
    assert select_layer_experts([1, 7, 2, 0], top_k=2, threshold=0.5) == [1, 2]


def test_threshold_and_mass():
    counts = [50, 30, 10, 6, 4, 0]  # shares .5 .3 .1 .06 .04 0
    assert select_layer_experts(counts, 1, threshold=0.1) == [0, 1]  # strictly above
    assert select_layer_experts(counts, 1, threshold=0.05) == [0, 1, 2, 3]
    assert select_layer_experts(counts, 1, mass=0.8) == [0, 1]
    assert select_layer_experts(counts, 1, mass=0.9) == [0, 1, 2]
    assert select_layer_experts(counts, 1, mass=1.0) == [0, 1, 2, 3, 4]
    assert select_experts({"a": counts, "b": [0, 1, 0, 0, 0, 0]}, {"a": 1, "b": 2}, mass=0.5) == \
        {"a": [0], "b": [0, 1]}


@pytest.mark.parametrize("kw", [dict(threshold=1.0), dict(threshold=-0.1), dict(mass=0.0), dict(mass=1.5),
                                dict(threshold=0.1, mass=0.9)])
def test_selection_range_errors(kw):
    with pytest.raises(ConfigError):
        check_selection(**kw)


@pytest.mark.parametrize("router,router_kwargs", ROUTER_KINDS)
def test_extracted_equals_full_when_every_used_expert_is_kept(make_moe, images, router, router_kwargs):
    model = make_moe(router, router_kwargs)
    counts, _ = count_usage(model, [images])
    with torch.no_grad():
        full = model(images)
    full_params, kept_total, experts_total = count_params(model), 0, 0
    for task in model.tasks:
        extracted = extract_model(model, task, counts[task])
        with torch.no_grad():
            out = extracted(images)
        assert out.shape == full[task].shape
        torch.testing.assert_close(out, full[task], atol=1e-5, rtol=0)
        assert count_params(extracted) < full_params
        kept_total += sum(map(len, extracted.info["kept"].values()))
        experts_total += sum(layer.num_experts for _, layer in model.moe_layers())
        if router == "task_level":  # fixed routing per task: folded into dense layers, no router left
            assert extracted.info["folded"] and not extracted.model.moe_layers()
            assert not any(isinstance(m, (MoEMlp, MoEAttention)) for m in extracted.modules())
    assert kept_total < experts_total  # experts really were dropped, so the equality is not trivial


def test_sliced_router_rows_and_task_embedding(make_moe, images):
    model = make_moe("per_task")
    counts, _ = count_usage(model, [images])
    extracted = extract_model(model, "normal", counts["normal"])
    t = model.task_index("normal")
    for name, layer in model.moe_layers():
        kept = extracted.info["kept"][name]
        small = extracted.model.get_submodule(name)
        assert small.num_experts == len(kept) and small.num_tasks == 1 and small.top_k == layer.top_k
        torch.testing.assert_close(small.router.weight[0], layer.router.weight[t, kept])
        if isinstance(layer, MoEMlp):
            torch.testing.assert_close(small.fc1.weight, layer.fc1.weight[kept])
        else:
            torch.testing.assert_close(small.q_weight, layer.q_weight[kept])
    torch.testing.assert_close(extracted.model.task_embed[0], model.task_embed[t])
    assert list(extracted.model.heads) == ["normal"]


def test_threshold_extraction_is_smaller(make_moe, images):
    model = make_moe("per_task")
    counts, _ = count_usage(model, [images])
    exact = extract_model(model, "depth_euclidean", counts["depth_euclidean"])
    smaller = extract_model(model, "depth_euclidean", counts["depth_euclidean"], threshold=0.2)
    assert count_params(smaller) < count_params(exact)
    for name, layer in model.moe_layers():
        assert len(smaller.info["kept"][name]) >= layer.top_k


OFFICIAL = dict(gate_values="topk_probs", task_embed="every_block", mi_reduce="sum", moa_bias="official",
                input_norm="minus1_1", class_token=True, fc_norm=True,
                tasks=["depth_euclidean", "normal", "class_scene", "class_object"])


@pytest.mark.parametrize("router,router_kwargs", ROUTER_KINDS)
def test_official_options_extract_exactly_keeping_every_gate_row(make_moe, images, router, router_kwargs):
    """Raw top-k prob gates: the extracted router keeps all of the task's gate rows (and the +1e-4), the layer only
    the kept experts' weights; the outputs equal the full model's on the counting images."""
    model = make_moe(router, router_kwargs, **OFFICIAL)  # task_level: folded layers without q/o biases
    counts, _ = count_usage(model, [images])
    with torch.no_grad():
        full = model(images)
    dropped = 0
    for task in model.tasks:
        extracted = extract_model(model, task, counts[task])
        with torch.no_grad():
            torch.testing.assert_close(extracted(images), full[task], atol=1e-5, rtol=0)
        if router == "task_level":
            continue
        t = model.task_index(task)
        for name, layer in model.moe_layers():
            small = extracted.model.get_submodule(name)
            kept = extracted.info["kept"][name]
            assert small.num_experts == len(kept) and small.router.num_gate_rows == layer.num_experts
            if router == "per_task":
                torch.testing.assert_close(small.router.weight[0], layer.router.weight[t])
            dropped += layer.num_experts - len(kept)
    assert router == "task_level" or dropped > 0


def test_paper_threshold_rule():
    from modsquad.extract.prune import paper_threshold

    assert paper_threshold(6) == pytest.approx(0.005) and paper_threshold(4) == pytest.approx(0.0075)
    counts = [400, 300, 200, 94, 5, 1]  # shares .4 .3 .2 .094 .005 .001
    assert select_experts({"a": counts}, {"a": 4}, paper=True) == {"a": [0, 1, 2, 3]}  # .005 < .0075
    assert select_experts({"a": counts}, {"a": 6}, paper=True) == {"a": [0, 1, 2, 3, 4, 5]}  # at least top-k
    ema = [0.5, 0.3, 0.006, 0.02, 0.174]  # an EMA of counts works as well: 1.5 % for top-2
    assert select_experts({"a": ema}, {"a": 2}, paper=True) == {"a": [0, 1, 3, 4]}
    with pytest.raises(ConfigError):
        select_experts({"a": counts}, {"a": 4}, threshold=0.1, paper=True)
