def test_bench_moe_quick_smoke(run_tool):
    result, stdout = run_tool("bench_moe.py", "--quick")
    assert {r["layer"] for r in result["layers"]} == {"mlp", "attention"}
    assert {r["dtype"] for r in result["layers"]} == {"fp32", "bf16"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["layers"])
    assert "speedup" in result["model"] or "skipped" in result["model"]
    assert "fwd+bwd / dense" in stdout
