"""`modsquad usage`, `modsquad extract` and `modsquad predict` end to end on a tiny run with synthetic data."""

import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from modsquad.checkpoint import save_model
from modsquad.cli import app
from modsquad.config import config_from_dict, save_config
from modsquad.data import synthesize
from modsquad.models import MultiTaskViT

TASKS = ["depth_euclidean", "normal", "segment_semantic"]
runner = CliRunner()


def _model(seed: int = 0, **overrides) -> MultiTaskViT:
    kwargs = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, router="per_task",
                  moe_layout="both", attn_experts=8, attn_top_k=2, attn_head_dim=16, mlp_experts=8, mlp_top_k=2)
    torch.manual_seed(seed)
    model = MultiTaskViT(tasks=TASKS, **{**kwargs, **overrides})
    with torch.no_grad():  # zero-initialised gates would route every token alike
        for _, layer in model.moe_layers():
            for p in layer.router.parameters():
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/tiny/{config.yaml, last.safetensors} on a 12-image synthetic suite (4 val images)."""
    base = tmp_path_factory.mktemp("cli_extract")
    synthesize(base / "synth", images=12, size=32, seed=0)
    cfg = config_from_dict({"model": {"name": "modsquad_vit_tiny", "tasks": TASKS, "img_size": 32},
                            "data": {"format": "synthetic", "root": str(base / "synth"), "batch_size": 3}})
    save_config(cfg, base / "run" / "config.yaml")
    save_model(base / "run" / "last.safetensors", _model())
    return base / "run"


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _user_error(args, *expected):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output.replace("\n", "")
    return result


def test_usage(run_dir, tmp_path):
    result = _ok(["usage", run_dir, "--out", tmp_path])
    report = json.loads((tmp_path / "usage.json").read_text())
    assert report["data"]["images"] == 4 and report["data"]["split"] == "train"  # counted on the training split
    assert sorted(report["counts"]) == sorted(TASKS)
    assert (tmp_path / "usage.png").stat().st_size > 0
    assert "90%/99%" in result.output and "segment_semantic" in result.output


def test_extract_and_predict(run_dir, tmp_path):
    out = tmp_path / "ext"
    result = _ok(["extract", run_dir, "--out", out, "--tasks", "normal,depth_euclidean", "--onnx"])
    assert "max |diff|" in result.output and "train images usage was counted on" in result.output
    assert "coverage" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["depth_euclidean", "normal"]
    for task in ("normal", "depth_euclidean"):
        info = json.loads((out / task / "config.json").read_text())
        # exact (to float rounding) on the images usage was counted on: every expert they used is kept
        assert info["counted"]["split"] == "train" and info["counted"]["max_abs_diff"] <= 1e-5
        assert info["max_abs_diff"] == info["counted"]["max_abs_diff"]
        # on held-out images only as far as the routing stays inside the kept experts: measured, not claimed
        held = info["heldout"]
        assert held["split"] == "val" and held["images"] == 4 and 0.0 <= held["coverage"] <= 1.0
        if held["tokens_covered"] == 1.0:
            assert held["max_abs_diff"] <= 1e-5
        assert info["check_images"] == {"count": 4, "kind": "train images usage was counted on"}
        assert info["params"]["extracted"] < info["params"]["full"]
        assert info["onnx"]["max_abs_diff"] <= 1e-4 and (out / task / "model.onnx").is_file()

    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    _ok(["predict", out / "normal", image, "--out", tmp_path / "pred", "--raw"])
    assert cv2.imread(str(tmp_path / "pred" / "photo_normal_raw.png")).shape == (50, 70, 3)  # at the photo's size
    assert cv2.imread(str(tmp_path / "pred" / "photo_normal.png")).shape[1] > 2 * 70  # input | prediction panel
    _ok(["predict", run_dir, image, "--tasks", "segment_semantic", "--out", tmp_path / "pred"])
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "photo_normal.png", "photo_normal_raw.png", "photo_segment_semantic.png"]


def test_extract_with_usage_file_and_mass(run_dir, tmp_path):
    _ok(["usage", run_dir, "--out", tmp_path])
    _ok(["extract", run_dir, "--out", tmp_path / "ext", "--usage", tmp_path / "usage.json", "--mass", "0.5",
         "--tasks", "segment_semantic"])
    info = json.loads((tmp_path / "ext" / "segment_semantic" / "config.json").read_text())
    assert info["selection"]["mode"] == "mass" and info["selection"]["mass"] == 0.5


def test_every_expert_kept_is_exact_on_held_out_images(run_dir, tmp_path):
    """With every expert kept, held-out coverage is 1 and the outputs equal the full model's to float rounding."""
    _ok(["usage", run_dir, "--out", tmp_path])
    report = json.loads((tmp_path / "usage.json").read_text())
    report["counts"] = {t: {layer: [1] * len(row) for layer, row in rows.items()}
                        for t, rows in report["counts"].items()}
    (tmp_path / "usage.json").write_text(json.dumps(report))
    _ok(["extract", run_dir, "--out", tmp_path / "ext", "--usage", tmp_path / "usage.json", "--tasks", "normal"])
    info = json.loads((tmp_path / "ext" / "normal" / "config.json").read_text())
    assert info["heldout"]["split"] == "val" and info["heldout"]["coverage"] == 1.0
    assert info["heldout"]["max_abs_diff"] <= 1e-5 and info["counted"]["max_abs_diff"] <= 1e-5


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------

@pytest.mark.parametrize("option", [["--threshold", "1.0"], ["--threshold", "-0.1"], ["--mass", "0"],
                                    ["--mass", "1.5"], ["--threshold", "0.1", "--mass", "0.9"]])
def test_selection_out_of_range(run_dir, tmp_path, option):
    _user_error(["extract", run_dir, "--out", tmp_path / "ext", *option])
    assert not (tmp_path / "ext").exists()


def test_unknown_task(run_dir, tmp_path):
    _user_error(["extract", run_dir, "--out", tmp_path / "ext", "--tasks", "normal,nope"], "'nope'")
    assert not (tmp_path / "ext").exists()
    _user_error(["predict", run_dir, tmp_path / "x.png", "--task", "nope"], "'nope'")


def test_truncated_checkpoint(run_dir, tmp_path):
    data = (run_dir / "last.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[:len(data) // 3])
    for cmd in (["extract", tmp_path / "bad.safetensors", "--out", tmp_path / "ext"],
                ["usage", tmp_path / "bad.safetensors", "--out", tmp_path / "ext"]):
        _user_error(cmd, "bad.safetensors")
    assert not (tmp_path / "ext").exists()


def test_checkpoint_of_another_architecture(run_dir, tmp_path):
    # a plain (non-modsquad) safetensors file, e.g. a timm ViT
    save_file({"cls_token": torch.zeros(1, 1, 8)}, str(tmp_path / "timm.safetensors"))
    _user_error(["extract", tmp_path / "timm.safetensors", "--out", tmp_path / "ext"], "not a modsquad checkpoint")
    # modsquad metadata whose architecture does not fit the weights
    small = _model(mlp_experts=4)
    state = {k: v.contiguous() for k, v in _model().state_dict().items()}
    save_file(state, str(tmp_path / "mixed.safetensors"),
              metadata={"format": "modsquad", "version": "0", "model_config": json.dumps(small.config)})
    _user_error(["extract", tmp_path / "mixed.safetensors", "--out", tmp_path / "ext"], "do not match")
    assert not (tmp_path / "ext").exists()


def test_usage_needs_data(run_dir, tmp_path):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run_dir / "last.safetensors").read_bytes())  # no config.yaml next to it
    _user_error(["usage", lone, "--out", tmp_path / "u"], "--data")
    _user_error(["extract", lone, "--out", tmp_path / "ext", "--data", tmp_path / "missing"], "does not exist")
    assert not (tmp_path / "u").exists() and not (tmp_path / "ext").exists()


def test_unreadable_image(run_dir, tmp_path):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    # a batch skips and reports the unreadable file and predicts the rest
    result = _ok(["predict", run_dir, good, tmp_path / "broken.jpg", "--out", tmp_path / "pred"])
    assert "broken.jpg" in result.output.replace("\n", "") and "Traceback" not in result.output
    assert any(p.name.startswith("good_") for p in (tmp_path / "pred").iterdir())
    # nothing readable at all: one line, exit 2, nothing written
    _user_error(["predict", run_dir, tmp_path / "broken.jpg", "--out", tmp_path / "pred2"], "broken.jpg")
    assert not (tmp_path / "pred2").exists()


def test_not_an_extracted_model(run_dir, tmp_path):
    image = tmp_path / "good.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    _ok(["extract", run_dir, "--out", tmp_path / "ext", "--tasks", "normal"])
    weights = tmp_path / "ext" / "normal" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _user_error(["predict", tmp_path / "ext" / "normal", image, "--out", tmp_path / "pred"], "sha256")
    assert not (tmp_path / "pred").exists()
