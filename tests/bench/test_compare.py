"""`compare_runs` on saved runs: tiny checkpoints, config.yaml and hand-written metrics.json, so every number in
the table is known in advance."""

import json
import math
import os

import pytest
import torch

from modsquad.bench.compare import (
    compare_markdown,
    compare_runs,
    compare_table,
    default_compare_out,
    task_metrics_table,
    usage_stats,
    write_compare,
)
from modsquad.checkpoint import save_model
from modsquad.config import config_from_dict, save_config
from modsquad.core.errors import UserError
from modsquad.extract.usage import save_usage, usage_report
from modsquad.models import create_model

TASKS = ["depth_euclidean", "segment_semantic"]
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "moe_layout": "both", "attn_experts": 4,
        "attn_top_k": 2, "attn_head_dim": 16, "mlp_experts": 4, "mlp_top_k": 2, "mlp_expert_hidden": 32}
#: primary metrics: depth l1 (lower is better), segmentation miou (higher is better)
METRICS = {
    "dense": {"depth_euclidean": {"l1": 0.5, "rmse": 0.7}, "segment_semantic": {"miou": 0.40, "pixel_acc": 0.8}},
    "per_task": {"depth_euclidean": {"l1": 0.4, "rmse": 0.6}, "segment_semantic": {"miou": 0.50, "pixel_acc": 0.85}},
    "task_level": {"depth_euclidean": {"l1": 0.6, "rmse": 0.8}, "segment_semantic": {"miou": 0.40, "pixel_acc": 0.8}},
}


def make_run(path, router, metrics, aux=None, router_kwargs=None, usage_json=False):
    """A run directory as `modsquad train` + `modsquad eval` leave it, without training."""
    torch.manual_seed(0)
    overrides = {**TINY, "router": router, **({"router_kwargs": router_kwargs} if router_kwargs else {})}
    model = create_model("modsquad_vit_tiny", TASKS, img_size=32, **overrides)
    if router != "dense":
        model.eval()(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))  # usage counters
    path.mkdir(parents=True)
    save_model(path / "last.safetensors", model, {"step": 7})
    cfg = config_from_dict({"name": path.name, "model": {"name": "modsquad_vit_tiny", "tasks": TASKS, "img_size": 32,
                                                         "overrides": overrides},
                            "data": {"root": str(path / "no_data")}, "aux": aux or {}})
    save_config(cfg, path / "config.yaml")
    (path / "metrics.json").write_text(json.dumps({"split": "val", "metrics": metrics}))
    if usage_json:
        save_usage(usage_report(model, model.expert_usage()), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return [make_run(root / "dense", "dense", METRICS["dense"]),
            make_run(root / "per_task", "per_task", METRICS["per_task"], aux={"mi": 0.005}, usage_json=True),
            make_run(root / "task_level", "task_level", METRICS["task_level"], router_kwargs={"mode": "gumbel_st"})]


def test_compare_runs_against_the_dense_run(runs):
    result = compare_runs(runs)
    assert result["baseline"] == "dense" and result["tasks"] == TASKS
    dense, per_task, task_level = result["runs"]
    assert dense["delta_m"] == {"depth_euclidean": 0.0, "segment_semantic": 0.0, "mean": 0.0}
    assert per_task["delta_m"]["depth_euclidean"] == pytest.approx(20.0)  # l1 0.4 vs 0.5, lower is better
    assert per_task["delta_m"]["segment_semantic"] == pytest.approx(25.0)  # miou 0.5 vs 0.4
    assert per_task["delta_m"]["mean"] == pytest.approx(22.5)
    assert task_level["delta_m"]["mean"] == pytest.approx(-10.0)
    assert (dense["label"], per_task["label"], task_level["label"]) == ("dense", "per_task +MI", "task_level/gumbel_st")
    assert dense["usage"] is None
    assert per_task["usage"]["source"] == "usage.json" and task_level["usage"]["source"] == "checkpoint"
    for row in result["runs"]:
        assert row["params"] > 0 and row["flops"] > 0 and row["step"] == 7
    # MoE layers run 2 of 4 experts per token, and the encoder once per task: more active FLOPs than dense
    assert per_task["flops"] > dense["flops"]


def test_explicit_baseline_and_flops_off(runs):
    result = compare_runs(runs[1:], baseline=runs[0], flops=False)
    assert result["baseline"] == "dense" and [r["name"] for r in result["runs"]] == ["per_task", "task_level"]
    assert all(r["flops"] is None for r in result["runs"])
    assert result["runs"][0]["delta_m"]["mean"] == pytest.approx(22.5)
    assert compare_runs(runs[1:], flops=False)["baseline"] is None  # no dense run among them: no delta_m


def test_write_compare_files(runs, tmp_path):
    result = compare_runs(runs)
    paths = write_compare(result, tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["runs"]] == ["dense", "per_task", "task_level"]
    md = paths["md"].read_text()
    assert "| per_task | per_task +MI |" in md and "+22.50" in md and "## All metrics" in md
    assert "segment_semantic miou ↑" in md and "depth_euclidean l1 ↓" in md
    assert md == compare_markdown(result)
    table = compare_table(result)
    assert table.row_count == 3 and "usage\nshare" in [c.header for c in table.columns]
    metrics = task_metrics_table(result)
    assert metrics.row_count == len(TASKS) and [c.header for c in metrics.columns][2:] == ["dense", "per_task",
                                                                                          "task_level"]


def test_tables_fit_100_columns(runs):
    """Nothing cropped at 100 columns: every run name and delta_m value is printed whole."""
    from rich.console import Console

    console = Console(width=100, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    result = compare_runs(runs, flops=False)
    console.print(compare_table(result))
    console.print(task_metrics_table(result))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    for needle in ("+22.50", "-10.00", "task_level", "segment_semantic", "miou ↑"):
        assert needle in text, needle


def test_missing_metrics_asks_for_eval(runs, tmp_path):
    run = make_run(tmp_path / "fresh", "per_task", METRICS["per_task"])
    (run / "metrics.json").unlink()
    with pytest.raises(UserError, match=r"fresh: no metrics.json and no val evaluation in metrics.jsonl; "
                                        r"run `modsquad eval .*fresh` first"):
        compare_runs([runs[0], run])


def test_metrics_recorded_by_training_are_used(runs, tmp_path):
    """Without metrics.json the eval record of metrics.jsonl at the checkpoint's step is used (else the last)."""
    run = make_run(tmp_path / "trained", "per_task", METRICS["dense"])
    (run / "metrics.json").unlink()
    logged = [{"kind": "train", "step": 5, "loss": 1.0},
              {"kind": "eval", "step": 7, "metrics": METRICS["per_task"]},  # the checkpoint's step (7)
              {"kind": "eval", "step": 9, "metrics": METRICS["task_level"]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged) + '{"kind": "ev')  # torn
    row = compare_runs([runs[0], run], flops=False)["runs"][1]
    assert row["metrics"] == METRICS["per_task"] and row["metrics_source"] == "metrics.jsonl step 7"
    assert row["delta_m"]["mean"] == pytest.approx(22.5)
    (run / "metrics.jsonl").write_text(json.dumps(logged[2]) + "\n")
    row = compare_runs([run], flops=False)["runs"][0]
    assert row["metrics"] == METRICS["task_level"] and row["metrics_source"] == "metrics.jsonl step 9"


def test_a_run_given_twice_is_compared_once(runs, tmp_path):
    again = [runs[0], runs[1], f"{runs[0]}/", runs[0] / "last.safetensors", runs[1] / ".." / runs[1].name]
    result = compare_runs(again, flops=False)
    assert [r["name"] for r in result["runs"]] == ["dense", "per_task"]
    out = default_compare_out(result)
    assert out == runs[0].parent / "compare"  # beside the runs, not in the current folder
    write_compare(result, out)
    # a later `compare runs/*` catches that folder: it is not a run and is left out
    assert len(compare_runs([*runs, out], flops=False)["runs"]) == 3
    assert default_compare_out(compare_runs([runs[1]], flops=False)) == runs[1] / "compare"


def test_usage_stats_disjoint_and_uniform():
    disjoint = {"a": {"l0": [10, 10, 0, 0]}, "b": {"l0": [0, 0, 10, 10]}}
    stats = usage_stats(disjoint)
    assert stats["share"] == pytest.approx(0.5) and stats["mi"] == pytest.approx(math.log(2))
    uniform = {"a": {"l0": [5, 5, 5, 5]}, "b": {"l0": [5, 5, 5, 5]}}
    stats = usage_stats(uniform)
    assert stats["share"] == pytest.approx(1.0) and stats["mi"] == pytest.approx(0.0)
    assert usage_stats({"a": {"l0": [0, 0]}}) is None


def test_active_flops_do_not_depend_on_the_call_order(runs):
    """The first forward of a process may probe grouped_mm support; its matmuls must not be counted."""
    from modsquad.bench.compare import active_flops
    from modsquad.checkpoint import load_model
    from modsquad.moe import dispatch

    model = load_model(runs[1])
    dispatch._GROUPED_MM_SUPPORT.clear()
    first = active_flops(model)
    assert active_flops(model) == first
