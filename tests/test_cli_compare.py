"""`modsquad compare` through typer's CliRunner on runs saved to disk (no training)."""

import json

import torch
from typer.testing import CliRunner

from modsquad.checkpoint import save_model
from modsquad.cli import app
from modsquad.config import config_from_dict, save_config
from modsquad.models import create_model

TASKS = ["depth_euclidean", "normal"]
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "attn_experts": 4, "attn_top_k": 2,
        "attn_head_dim": 16, "mlp_experts": 4, "mlp_top_k": 2, "mlp_expert_hidden": 32}


def _run(path, router, l1, angle):
    overrides = {**TINY, "router": router}
    model = create_model("modsquad_vit_tiny", TASKS, img_size=32, **overrides)
    path.mkdir(parents=True)
    save_model(path / "last.safetensors", model, {"step": 3})
    save_config(config_from_dict({"model": {"name": "modsquad_vit_tiny", "tasks": TASKS, "img_size": 32,
                                            "overrides": overrides}}), path / "config.yaml")
    metrics = {"depth_euclidean": {"l1": l1, "rmse": 2 * l1}, "normal": {"mean_angle": angle}}
    (path / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return str(path)


def _output(result) -> str:
    return " ".join(result.output.split())


def test_compare_cli(tmp_path):
    torch.manual_seed(0)
    dense = _run(tmp_path / "dense", "dense", 0.5, 20.0)
    moe = _run(tmp_path / "moe", "per_task", 0.25, 20.0)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", dense, moe, "--out", str(out), "--no-flops"])
    assert result.exit_code == 0, _output(result)
    text = _output(result)
    assert "dense" in text and "moe" in text and "+25.00" in text  # (50 % on depth + 0 on normals) / 2
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "compare.json").read_text())["baseline"] == "dense"

    result = CliRunner().invoke(app, ["compare", moe, "--baseline", moe, "--out", str(out)])
    assert result.exit_code == 0 and "+0.00" in _output(result), _output(result)


def test_compare_cli_uses_the_training_eval_and_writes_beside_the_runs(tmp_path, monkeypatch):
    """No `modsquad eval` needed: the eval record training wrote to metrics.jsonl is used; without --out the
    files go to compare/ beside the runs, not into the current folder; a run given twice shows once."""
    dense = _run(tmp_path / "runs" / "dense", "dense", 0.5, 20.0)
    moe = _run(tmp_path / "runs" / "moe", "per_task", 0.25, 20.0)
    (tmp_path / "runs" / "moe" / "metrics.json").unlink()
    record = {"kind": "eval", "step": 3, "metrics": {"depth_euclidean": {"l1": 0.25}, "normal": {"mean_angle": 20.0}}}
    (tmp_path / "runs" / "moe" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.chdir(tmp_path / "runs" / "moe")
    result = CliRunner().invoke(app, ["compare", dense, moe, f"{moe}/", "--no-flops"], terminal_width=100)
    assert result.exit_code == 0, _output(result)
    assert "+25.00" in _output(result) and "metrics.jsonl step 3" in _output(result)
    assert sorted(p.name for p in (tmp_path / "runs" / "compare").iterdir()) == ["compare.json", "compare.md",
                                                                                  "compare.png"]
    assert len(json.loads((tmp_path / "runs" / "compare" / "compare.json").read_text())["runs"]) == 2
    assert not (tmp_path / "runs" / "moe" / "compare_out").exists()


def test_compare_cli_needs_eval(tmp_path):
    run = _run(tmp_path / "fresh", "per_task", 0.3, 10.0)
    (tmp_path / "fresh" / "metrics.json").unlink()
    result = CliRunner().invoke(app, ["compare", run, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2
    assert "no metrics.json and no val evaluation in metrics.jsonl; run `modsquad eval" in _output(result)
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "missing" in _output(result)
