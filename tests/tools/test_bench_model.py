def test_bench_model_quick_writes_every_row(run_tool):
    result, stdout = run_tool("bench_model.py", "--quick")
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
