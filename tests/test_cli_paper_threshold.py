"""`modsquad extract --paper-threshold`: Mod-Squad's pruning rule (usage > 3/k %) from the command line."""

import json

import torch
from typer.testing import CliRunner

from modsquad.checkpoint import save_model
from modsquad.cli import app
from modsquad.core.hashing import file_sha256
from modsquad.extract.usage import count_usage, save_usage, usage_report
from modsquad.models import MultiTaskViT

runner = CliRunner()


def _run(tmp_path):
    torch.manual_seed(0)
    model = MultiTaskViT(tasks=["depth_euclidean", "normal"], img_size=32, patch_size=16, embed_dim=32, depth=2,
                         num_heads=2, mlp_ratio=2.0, moe_layout="both", attn_experts=8, attn_top_k=2,
                         attn_head_dim=16, mlp_experts=8, mlp_top_k=2, gate_values="topk_probs")
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.router.weight.normal_(0.0, 1.0)
    path = save_model(tmp_path / "run" / "last.safetensors", model)
    counts, n = count_usage(model.eval(), [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    save_usage(usage_report(model, counts, checkpoint=str(path), checkpoint_sha256=file_sha256(path),
                            data={"images": n}), path.parent)
    return path


def test_paper_threshold_extracts(tmp_path):
    ckpt = _run(tmp_path)
    result = runner.invoke(app, ["extract", str(ckpt), "--out", str(tmp_path / "out"), "--paper-threshold",
                                 "--usage", str(ckpt.parent / "usage.json"), "--check-images", "1"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "out" / "normal" / "config.json").read_text())
    assert info["selection"]["threshold"] == "paper"
    assert all(len(layer["kept"]) >= 2 for layer in info["layers"].values())


def test_paper_threshold_conflicts_with_threshold(tmp_path):
    ckpt = _run(tmp_path)
    result = runner.invoke(app, ["extract", str(ckpt), "--out", str(tmp_path / "out"), "--paper-threshold",
                                 "--threshold", "0.1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--paper-threshold" in result.output
