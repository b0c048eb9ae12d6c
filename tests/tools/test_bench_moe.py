import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_moe_quick_smoke(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_moe.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert {r["layer"] for r in result["layers"]} == {"mlp", "attention"}
    assert {r["dtype"] for r in result["layers"]} == {"fp32", "bf16"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["layers"])
    assert "speedup" in result["model"] or "skipped" in result["model"]
    assert "fwd+bwd / dense" in proc.stdout
