import pytest


def test_bench_model_quick_writes_every_row(run_tool):
    result, stdout = run_tool("bench_model.py", "--quick", "--model-kwargs", "moa_bias=qo_bias")
    rows = {r["row"]: r for r in result["rows"]}
    assert {"layer_fwd_bwd_vs_dense:loop", "train_throughput_vs_dense", "infer_throughput_vs_dense",
            "latency_full_vs_dense", "latency_extracted_vs_full", "latency_extracted_vs_dense",
            "compile_latency_vs_eager"} <= set(rows)
    assert all(r["value"] > 0 for r in rows.values())
    assert rows["compile_latency_vs_eager"]["works"] is True
    assert result["model"]["compile"]["max_abs_diff"] < 1e-4
    # half of every MoE layer's experts (at least top-k) are kept
    kept, experts = result["model"]["kept_experts"], result["model"]["experts"]
    assert all(kept[n] < experts[n] for n in experts)
    assert result["device_name"] and result["device"] == "cpu"
    assert "latency_extracted_vs_full" in stdout
    # the FLOP-normalised rows: the raw ratio scaled by the active-FLOP ratio, without a goal
    flops = result["model"]["flops_per_image"]
    ratio = flops["full"] / flops["dense"]
    per_flop = rows["train_throughput_vs_dense:per_flop"]
    assert per_flop["goal"] is None and per_flop["met"] is None
    assert per_flop["value"] == pytest.approx(rows["train_throughput_vs_dense"]["value"] * ratio)
    assert rows["latency_full_vs_dense:per_flop"]["value"] == pytest.approx(
        ratio / rows["latency_full_vs_dense"]["value"])
    assert result["model"]["model_overrides"] == {"moa_bias": "qo_bias"}


def test_bench_model_rejects_bad_model_kwargs(run_tool):
    with pytest.raises(AssertionError, match="KEY=VALUE"):
        run_tool("bench_model.py", "--quick", "--model-kwargs", "no-equals-sign")
