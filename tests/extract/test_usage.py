import json

import numpy as np
import pytest
import torch

from modsquad.core.errors import CheckpointError
from modsquad.extract.usage import (
    check_usage_matches,
    count_usage,
    load_usage,
    mass_summary,
    save_usage,
    usage_report,
)
from modsquad.moe import MoEMlp

from .conftest import random_images


def _hand_count(model, images):
    """Recompute every per_task router's choice from its weights with numpy, token by token, and count them."""
    inputs = {}

    def keep_inputs(name):
        def hook(module, args, out):
            inputs[name] = args
        return hook

    hooks = [layer.router.register_forward_hook(keep_inputs(name)) for name, layer in model.moe_layers()]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    counts = {t: {} for t in model.tasks}
    for name, layer in model.moe_layers():
        x, task_ids = (a.numpy() for a in inputs[name])
        weight = layer.router.weight.detach().numpy()  # [tasks, E, D]
        table = np.zeros((len(model.tasks), layer.num_experts), dtype=int)
        for token, task in zip(x, task_ids, strict=True):
            logits = weight[task] @ token
            for e in np.argsort(-logits, kind="stable")[:layer.top_k]:
                table[task, e] += 1
        for t, task in enumerate(model.tasks):
            counts[task][name] = table[t].tolist()
    return counts


def test_counts_match_hand_count(make_moe):
    model = make_moe("per_task")
    images = random_images(3)
    counts, n = count_usage(model, [images[:2], images[2:]])
    assert n == 3
    model.reset_usage()
    hand = {t: {k: [0] * len(v) for k, v in rows.items()} for t, rows in counts.items()}
    for batch in (images[:2], images[2:]):
        for t, rows in _hand_count(model, batch).items():
            for k, row in rows.items():
                hand[t][k] = [a + b for a, b in zip(hand[t][k], row, strict=True)]
    assert counts == hand
    tokens = 3 * 4  # 32 px, patch 16
    for t in model.tasks:
        for name, layer in model.moe_layers():
            assert sum(counts[t][name]) == tokens * layer.top_k


def test_count_usage_max_images_and_mode(make_moe):
    model = make_moe("shared").train()
    batches = [random_images(2, seed=s) for s in range(3)]
    counts, n = count_usage(model, batches, max_images=3)
    assert n == 3 and model.training
    name, layer = model.moe_layers()[0]
    assert sum(counts["normal"][name]) == 3 * 4 * layer.top_k


def test_mass_summary():
    summary = mass_summary({"a": {"l": [5, 3, 1, 1]}, "b": {"l": [0, 0, 10, 0]}})
    assert summary["0.9"] == {"a": {"l": 3}, "b": {"l": 1}}
    assert summary["0.99"] == {"a": {"l": 4}, "b": {"l": 1}}


def test_save_and_load(make_moe, images, tmp_path):
    model = make_moe("task_conditioned")
    counts, n = count_usage(model, [images])
    report = usage_report(model, counts, checkpoint="x.safetensors", data={"images": n})
    json_path, png_path = save_usage(report, tmp_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_usage(tmp_path)
    assert loaded["counts"] == counts and loaded["tasks"] == model.tasks
    assert [d["kind"] for d in loaded["layers"]] == ["attn", "mlp", "attn", "mlp"]
    assert set(loaded["experts_for_mass"]) == {"0.9", "0.99"}
    check_usage_matches(loaded, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage.json", "usage.png"]  # no temp files left


def test_usage_of_another_model_is_rejected(make_moe, images, tmp_path):
    model = make_moe("per_task")
    counts, _ = count_usage(model, [images])
    other = make_moe("per_task", mlp_experts=4)
    with pytest.raises(CheckpointError, match="another checkpoint"):
        check_usage_matches(usage_report(model, counts), other)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "other"}), json.dumps([1, 2])])
def test_bad_usage_file(tmp_path, content):
    path = tmp_path / "usage.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match="usage"):
        load_usage(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_usage(tmp_path / "missing.json")


def test_dense_layers_are_not_counted(make_moe, images):
    model = make_moe("per_task", moe_layout="mlp")
    counts, _ = count_usage(model, [images])
    assert all(set(rows) == {n for n, m in model.moe_layers()} for rows in counts.values())
    assert all(isinstance(m, MoEMlp) for _, m in model.moe_layers())


# --- held-out routing coverage --------------------------------------------------------------------------

def _used(counts):
    return {t: {layer: [e for e, c in enumerate(row) if c] for layer, row in rows.items()}
            for t, rows in counts.items()}


def test_routing_coverage_is_one_on_the_counting_images_and_with_every_expert(make_moe):
    from modsquad.extract.usage import routing_coverage

    model = make_moe("per_task")
    counting, heldout = random_images(2, seed=1), random_images(3, seed=7)
    counts, _ = count_usage(model, [counting])
    used = _used(counts)
    on_counting, n = routing_coverage(model, [counting], used)
    assert n == 2 and all(r["coverage"] == 1.0 and r["tokens_covered"] == 1.0 for r in on_counting.values())
    every = {t: {name: list(range(layer.num_experts)) for name, layer in model.moe_layers()} for t in model.tasks}
    assert all(r["coverage"] == 1.0 for r in routing_coverage(model, [heldout], every)[0].values())
    one = {t: {name: [0] for name, _ in model.moe_layers()} for t in model.tasks}  # fewer than top_k: never covered
    assert all(r["coverage"] == 0.0 for r in routing_coverage(model, [heldout], one)[0].values())
    partial, _ = routing_coverage(model, [heldout], used)
    assert all(0.0 <= r["tokens_covered"] <= r["coverage"] <= 1.0 for r in partial.values())
    assert model.expert_usage() == counts  # measuring coverage leaves the usage counters alone
