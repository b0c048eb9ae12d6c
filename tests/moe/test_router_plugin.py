"""A router is one file: tests/plugins/cosine_router.py registers a new router outside the package, and train,
usage, extract, add-tasks with frozen experts and bench work on it unchanged. Also the `Router` interfaces
(`slice`, `grow`, registry) on every built-in router and the plugin."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from modsquad.bench.bench import benchmark, count_params, task_param_count
from modsquad.checkpoint import load_model
from modsquad.config import load_config
from modsquad.data import synthesize
from modsquad.extract.export import write_extracted
from modsquad.extract.usage import compute_usage
from modsquad.moe import ROUTERS, Router, build_router, register_router, router_class, router_names
from modsquad.train.trainer import train
from modsquad.train.transfer import train_add_tasks

PLUGIN_FILE = Path(__file__).resolve().parents[1] / "plugins" / "cosine_router.py"
TASKS = ["depth_euclidean", "normal"]
NEW = "reshading"
SHRINK = ["model.img_size=32", "model.overrides.embed_dim=32", "model.overrides.depth=2",
          "model.overrides.num_heads=2", "model.overrides.attn_head_dim=16", "model.overrides.mlp_expert_hidden=32",
          f"model.tasks=[{','.join(TASKS)}]",
          "data.batch_size=4", "data.max_images=8", "eval.max_images=4", "train.steps=2", "train.warmup_steps=1",
          "train.log_every=1", "train.eval_every=0", "train.device=cpu", "output.visualize=0"]


def load_plugin():
    """Import the plugin file as a user's own module would be imported (it registers its router)."""
    name = "modsquad_test_plugins.cosine_router"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PLUGIN_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


PLUGIN = load_plugin()
KINDS = [("per_task", {}), ("per_task", {"noisy": True}), ("task_conditioned", {}), ("task_level", {}),
         ("shared", {}), (PLUGIN.NAME, {})]
DIM, EXPERTS, TOP_K, NUM_TASKS = 16, 6, 2, 3


def _router(kind, kwargs, gate_values="renormalized", seed=0) -> Router:
    torch.manual_seed(seed)
    router = build_router(kind, DIM, EXPERTS, TOP_K, NUM_TASKS, gate_values=gate_values, **kwargs)
    with torch.no_grad():  # zero-initialised gates tie everywhere: perturb them so routing is sparse
        for p in router.parameters():
            p.copy_(torch.randn(p.shape))
    return router.eval()


def test_registry_lists_and_builds_the_plugin():
    assert PLUGIN.NAME in router_names() and set(ROUTERS) <= set(router_names())
    assert PLUGIN.NAME not in ROUTERS  # the built-in names stay as they were
    router = build_router(PLUGIN.NAME, DIM, EXPERTS, TOP_K, NUM_TASKS)
    assert type(router) is PLUGIN.CosineRouter is router_class(PLUGIN.NAME) and router.kind == PLUGIN.NAME


def test_registry_rejects_clashes():
    class Other(Router):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_router("per_task")(Other)
    with pytest.raises(ValueError, match="dense"):
        register_router("dense")
    with pytest.raises(TypeError):
        register_router("not_a_router")(dict)
    assert "not_a_router" not in router_names()


@pytest.mark.parametrize("gate_values", ["renormalized", "topk_probs"])
@pytest.mark.parametrize("kind,kwargs", KINDS, ids=lambda v: v if isinstance(v, str) else None)
def test_slice_routes_like_the_task(kind, kwargs, gate_values):
    """A token whose chosen experts are all kept gets the same experts (renumbered) and the same weights."""
    router = _router(kind, kwargs, gate_values)
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1))
    task = 1
    full = router(x, torch.full((64,), task))
    kept = sorted({0, 5, *full.indices[0].tolist()})  # token 0's experts and two more (maybe the same)
    small = router.slice(task, kept)
    assert (small.num_tasks, small.num_experts, type(small)) == (1, len(kept), type(router))
    assert small.num_gate_rows == (EXPERTS if gate_values == "topk_probs" else len(kept))
    for name, p in small.task_parameters().items():
        assert p.shape[0] == 1, name
    sub = small(x, torch.zeros(64, dtype=torch.long))
    inside = torch.isin(full.indices, torch.tensor(kept)).all(1)
    assert inside.any()
    renumbered = torch.tensor(kept)[sub.indices]
    torch.testing.assert_close(renumbered[inside], full.indices[inside], rtol=0, atol=0)
    torch.testing.assert_close(sub.weights[inside], full.weights[inside], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,kwargs", KINDS, ids=lambda v: v if isinstance(v, str) else None)
def test_grow_copies_old_rows_and_inits_new_from_a_task(kind, kwargs):
    router = _router(kind, kwargs)
    grown = router.grow(2, init_from=0)
    assert grown.num_tasks == NUM_TASKS + 2 and type(grown) is type(router)
    by_task = set(router.task_parameters())
    assert by_task == set(grown.task_parameters())
    new_state = grown.state_dict()
    for name, old in router.state_dict().items():
        if name in by_task:
            assert torch.equal(new_state[name][:NUM_TASKS], old), name
            assert torch.equal(new_state[name][NUM_TASKS:], old[:1].expand(2, *old.shape[1:])), name
        else:
            assert torch.equal(new_state[name], old), name
    x = torch.randn(8, DIM)
    assert torch.equal(grown(x, torch.full((8,), 3)).indices, router(x, torch.zeros(8, dtype=torch.long)).indices)


def test_fixed_routing_is_declared_by_the_router():
    assert router_class("task_level").fixed_routing
    assert not any(router_class(k).fixed_routing for k in ("per_task", "task_conditioned", "shared", PLUGIN.NAME))
    router = _router("task_level", {})
    idx, w = router.fixed_choice(2)
    out = router(torch.randn(5, DIM), torch.full((5,), 2))
    assert torch.equal(out.indices, idx.expand(5, -1)) and torch.equal(out.weights, w.expand(5, -1))
    with pytest.raises(ValueError, match="fixed routing"):
        _router("per_task", {}).fixed_choice(0)


# --- the plugin end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, one_thread):
    """A 2-step training run of the tiny model with the plugin router and the official raw top-k prob gates
    (so extraction keeps every gate row of a task but only its used experts)."""
    tmp = tmp_path_factory.mktemp("plugin_router")
    root = tmp / "synth"
    synthesize(root, images=16, size=32, seed=0)
    cfg = load_config("synthetic_tiny", [*SHRINK, f"data.root={root}", f"model.overrides.router={PLUGIN.NAME}",
                               "model.overrides.gate_values=topk_probs"])
    result = train(cfg, tmp / "run", progress=False)
    assert result.step == 2
    return tmp


def test_plugin_router_trains_counts_extracts_grows_and_benches(plugin_run):
    run = plugin_run / "run"
    model = load_model(run)
    assert all(type(layer.router) is PLUGIN.CosineRouter for _, layer in model.moe_layers())

    report = compute_usage(run, max_images=4, device="cpu")
    assert [layer["router"] for layer in report["layers"]] == [PLUGIN.NAME] * len(model.moe_layers())
    assert {layer["kind"] for layer in report["layers"]} == {"attn", "mlp"}

    out = plugin_run / "extracted"
    summaries = write_extracted(run, out, max_images=1, check_images=1, device="cpu")  # 1 image: experts are dropped
    for task, summary in summaries.items():
        layers = dict(model.moe_layers())
        assert any(len(ids) < layers[name].num_experts for name, ids in summary["kept"].items()), task
        # on the images usage was counted on every chosen expert is kept: equal up to float rounding
        assert summary["counted"]["images"] > 0 and summary["counted"]["max_abs_diff"] < 1e-5, task
        assert summary["params"]["extracted"] < summary["params"]["full"]

    grown_run = plugin_run / "grown"
    train_add_tasks(run, [NEW], grown_run, freeze="experts", router_init_from="normal", progress=False)
    grown = load_model(grown_run)
    assert grown.tasks == [*TASKS, NEW]
    old = model.state_dict()
    for name, value in grown.state_dict().items():  # the old tasks' parameters are bitwise unchanged
        if name.endswith("usage") or name.startswith(f"heads.{NEW}."):
            continue
        assert torch.equal(value[:old[name].shape[0]] if value.shape != old[name].shape else value, old[name]), name

    per_task = sum(p.numel() for n, p in model.named_parameters() if n == "task_embed" or n.endswith("prototypes"))
    for task in TASKS:
        other = sum(count_params(model.heads[t]) for t in TASKS if t != task)
        assert task_param_count(model, task) == count_params(model) - other - per_task // len(TASKS)
    result = benchmark(run, out, batch_sizes=(1, 2), repeats=1, warmup=0, max_images=2, dense_baseline=False)
    assert set(result["tasks"]) == set(TASKS)
    for task, entry in result["tasks"].items():
        assert entry["full"]["params"] == task_param_count(model, task)
        assert entry["params"] < entry["full"]["params"] and entry["max_abs_diff"] >= 0, task
