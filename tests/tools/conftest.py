"""Run a script of tools/ the way a user does (its own process, from the repository root)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_tool(tmp_path):
    """`run_tool("bench_moe.py", "--quick")` -> (JSON written to --out, stdout); fails with the tool's output
    or when a temporary file is left beside the JSON."""

    def run(script: str, *args: str):
        out = tmp_path / f"{Path(script).stem}.json"
        proc = subprocess.run([sys.executable, str(REPO / "tools" / script), *args, "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not list(tmp_path.glob(".*.tmp")), "the JSON is written through a temporary file, renamed into place"
        return json.loads(out.read_text()), proc.stdout

    return run
