"""`modsquad train` / `modsquad eval` end to end through typer's CliRunner, on a fresh working directory:
the synthetic suite does not exist yet and is rendered by `train` from the config's synth settings."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from modsquad.cli import app

CONFIG = {
    "model": {"name": "modsquad_vit_tiny", "tasks": ["depth_euclidean", "normal", "segment_semantic"], "img_size": 32,
              "overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "attn_head_dim": 16,
                            "mlp_expert_hidden": 32, "attn_experts": 4, "mlp_experts": 4}},
    "data": {"format": "synthetic", "root": None, "batch_size": 8, "workers": 0,
             "synth": {"images": 48, "size": 32, "seed": 0}},
    "train": {"steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "device": "cpu"},
    "aux": {"mi": 0.005},
    "output": {"visualize": 1},
}


def _output(result) -> str:
    return " ".join(result.output.split())  # stdout and stderr, unwrapped


pytestmark = pytest.mark.usefixtures("one_thread")  # a dim-32 model: thread hand-offs would dominate


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def test_train_eval_resume(workdir):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", "tiny.yaml", "--out", "runs/cli"])
    assert result.exit_code == 0, _output(result)
    run = workdir / "runs" / "cli"
    assert (workdir / "data" / "synthetic" / "48x32_seed0" / "synth_info.json").is_file()
    for name in ("config.yaml", "last.safetensors", "best.safetensors", "state.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert "3/3 steps" in result.output

    result = runner.invoke(app, ["eval", "runs/cli", "--baseline", "runs/cli"])  # its training's logged eval
    assert result.exit_code == 0, _output(result)
    assert "delta_m" in json.loads((run / "metrics.json").read_text())
    result = runner.invoke(app, ["eval", "runs/cli", "--visualize", "1"])
    assert result.exit_code == 0, _output(result)
    result = runner.invoke(app, ["eval", "runs/cli", "--baseline", "runs/cli"])
    assert result.exit_code == 0, _output(result)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == set(CONFIG["model"]["tasks"])
    assert metrics["delta_m"]["mean"] == pytest.approx(0.0)
    for task in CONFIG["model"]["tasks"]:
        assert task in result.output
    assert list((run / "predictions").glob("*.png"))

    result = runner.invoke(app, ["train", "--resume", "--out", "runs/cli", "--set", "train.steps=5"])
    assert result.exit_code == 0, _output(result)
    assert "5/5 steps" in result.output


def test_config_typo_exits_2_naming_the_key(workdir):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", "tiny.yaml", "--set", "train.lrr=0.1"])
    assert result.exit_code == 2
    assert "train.lrr" in _output(result) and "Traceback" not in _output(result)
    bad = dict(CONFIG, trian={"steps": 1})
    (workdir / "typo.yaml").write_text(yaml.safe_dump(bad))
    result = runner.invoke(app, ["train", "--config", "typo.yaml"])
    assert result.exit_code == 2 and "trian" in _output(result)


def test_user_errors_exit_2(workdir):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--resume", "--out", "runs/none"])
    assert result.exit_code == 2 and "config.yaml" in _output(result)
    result = runner.invoke(app, ["eval", "runs/none"])
    assert result.exit_code == 2 and "runs/none" in _output(result)
    result = runner.invoke(app, ["eval", "runs/none", "--task-baseline", "normal"])
    assert result.exit_code == 2 and "TASK=" in _output(result)
