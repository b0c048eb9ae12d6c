"""Adding a task to a trained run (`modsquad train --from RUN --add-tasks X --freeze experts`): the old tasks'
parameters stay bitwise unchanged through training, resume and the CLI, and so their outputs stay equal to float
rounding (the grown model runs matmuls of other shapes, where BLAS may pick other kernels); only the new task
trains."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from modsquad.checkpoint import load_model
from modsquad.cli import app
from modsquad.config import config_from_dict
from modsquad.core.errors import ConfigError
from modsquad.run import GROW_FILE
from modsquad.train.trainer import train
from modsquad.train.transfer import train_add_tasks

OLD = ["depth_euclidean", "normal"]
NEW = "reshading"
# equal to float rounding: never bitwise across matmul shapes (1 ulp seen on AMD EPYC)
ROUNDING = dict(rtol=1e-5, atol=1e-6)
MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "moe_layout": "both", "attn_experts": 4,
         "attn_top_k": 2, "attn_head_dim": 16, "mlp_experts": 4, "mlp_top_k": 2, "mlp_expert_hidden": 32}


def _output(result) -> str:
    return " ".join(result.output.split())


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny two-task run trained a few steps on a 48-image synthetic suite, with weight decay on."""
    from modsquad.data import synthesize

    tmp = tmp_path_factory.mktemp("add_tasks")
    root = tmp / "synth"
    synthesize(root, images=48, size=32, seed=0)
    cfg = config_from_dict({
        "name": "base",
        "model": {"name": "modsquad_vit_tiny", "tasks": OLD, "img_size": 32, "overrides": MODEL},
        "data": {"format": "synthetic", "root": str(root), "batch_size": 8, "workers": 0},
        "train": {"steps": 4, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 1, "log_every": 2,
                  "eval_every": 0, "device": "cpu"},
        "aux": {"mi": 0.005},
        "output": {"visualize": 0},
    })
    out = tmp / "base"
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_old_parameters_unchanged(base_run, grown, new=(NEW,)):
    """The old tasks' parameters are bitwise the source run's: shared tensors whole, task-indexed ones on their
    old rows (dim 0). Only the new task's head is new; usage counters are buffers and keep counting."""
    old_state = load_model(base_run).state_dict()
    for name, value in grown.state_dict().items():
        if name.endswith("usage") or any(name.startswith(f"heads.{t}.") for t in new):
            continue
        ref = old_state[name]
        assert torch.equal(value[:ref.shape[0]] if value.shape != ref.shape else value, ref), name


def assert_outputs_close(before, after, tasks=OLD):
    for task in tasks:
        torch.testing.assert_close(after[task], before[task], **ROUNDING, msg=task)


def _old_outputs(run, images, tasks=OLD, file=None):
    model = load_model(run / file if file else run)
    with torch.no_grad():
        return model(images, tasks=tasks)


def test_frozen_experts_keep_old_tasks_parameters_and_outputs(base_run, images, tmp_path):
    before = _old_outputs(base_run, images)
    out = tmp_path / "grown"
    result = train_add_tasks(base_run, [NEW], out, freeze="experts", router_init_from="normal",
                             overrides=["train.steps=4", "train.lr=5e-3"], progress=False)
    assert result.step == 4
    grown = load_model(out / "last.safetensors")
    assert grown.tasks == [*OLD, NEW]
    with torch.no_grad():
        after = grown(images, tasks=OLD)
        everything = grown(images)  # old outputs do not depend on the other tasks in the forward
    assert_old_parameters_unchanged(base_run, grown)
    assert_outputs_close(before, after)
    assert_outputs_close(before, everything)
    # the new task trained: its rows started as copies of normal's (--router-init-from normal) and moved
    assert not torch.equal(grown.task_embed[2], grown.task_embed[1])
    assert not torch.equal(grown.blocks[0].mlp.router.weight[2], grown.blocks[0].mlp.router.weight[1])
    logs = _records(out, "train")
    assert f"loss/{NEW}" in logs[-1] and not any(f"loss/{t}" in logs[-1] for t in OLD)
    evals = _records(out, "eval")
    assert set(evals[-1]["metrics"]) == {*OLD, NEW}  # evaluation scores old and new tasks
    grow = json.loads((out / GROW_FILE).read_text())
    assert grow["new_tasks"] == [NEW] and grow["freeze"] == "experts" and grow["source_tasks"] == OLD
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["tasks"] == [*OLD, NEW]

    # resuming re-applies the freezing
    result = train_add_tasks(None, None, out, resume=True, overrides=["train.steps=6"], progress=False)
    assert result.step == 6
    assert_old_parameters_unchanged(base_run, load_model(out / "last.safetensors"))
    resumed = _old_outputs(out, images, file="last.safetensors")
    assert_outputs_close(before, resumed)


def test_unfrozen_training_changes_old_tasks(base_run, images, tmp_path):
    """The control: without freezing, training only the new task moves the old tasks' outputs (forgetting)."""
    before = _old_outputs(base_run, images)
    out = tmp_path / "unfrozen"
    train_add_tasks(base_run, [NEW], out, freeze="none", overrides=["train.steps=2"], progress=False)
    after = _old_outputs(out, images, file="last.safetensors")
    assert not all(torch.allclose(before[t], after[t], rtol=1e-3, atol=1e-4) for t in OLD)


def test_add_tasks_errors(base_run, tmp_path):
    with pytest.raises(ConfigError, match="already has"):
        train_add_tasks(base_run, ["normal"], tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="model comes from the source run"):
        train_add_tasks(base_run, [NEW], tmp_path / "x", overrides=["model.img_size=64"], progress=False)
    with pytest.raises(ConfigError, match="freeze"):
        train_add_tasks(base_run, [NEW], tmp_path / "x", freeze="heads", progress=False)


def test_cli_add_task_few_shot(base_run, images, tmp_path):
    before = _old_outputs(base_run, images)
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--from", str(base_run), "--add-tasks", NEW, "--freeze", "experts", "--out", str(out),
            "--set", "train.steps=2", "--set", "data.max_images=8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, _output(result)
    assert "parameters train" in _output(result) and "2/2 steps" in _output(result)
    assert_old_parameters_unchanged(base_run, load_model(out / "last.safetensors"))
    assert_outputs_close(before, _old_outputs(out, images, file="last.safetensors"))

    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--set", "train.steps=3"])
    assert result.exit_code == 0, _output(result)
    assert "3/3 steps" in _output(result)

    for bad, message in ((["train", "--add-tasks", NEW, "--out", str(tmp_path / "y")], "--from RUN"),
                         (["train", "--from", str(base_run), "--add-tasks", NEW, "--config", "c.yaml"],
                          "cannot be combined"),
                         (["train", "--config", "c.yaml", "--freeze", "experts"], "need --from")):
        result = runner.invoke(app, bad)
        assert result.exit_code == 2 and message in _output(result), _output(result)


def test_backbone_freeze_trains_only_new_head(base_run, tmp_path):
    out = tmp_path / "probe"
    train_add_tasks(base_run, [NEW], out, freeze="backbone", overrides=["train.steps=2"], progress=False)
    base, grown = load_model(base_run), load_model(out / "last.safetensors")
    old_state = base.state_dict()
    for name, value in grown.state_dict().items():
        if name.startswith(f"heads.{NEW}.") or name.endswith("usage"):
            continue
        ref = old_state[name]
        assert torch.equal(value[:ref.shape[0]] if value.shape != ref.shape else value, ref), name


def test_adding_tasks_is_reproducible_from_the_seed(base_run, tmp_path):
    """The new heads and router rows are initialised after seeding: two runs of the same command are equal."""
    from safetensors.torch import load_file

    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1234 + ord(name))  # whatever the process's state, the seed decides
        train_add_tasks(base_run, [NEW], tmp_path / name, freeze="experts", overrides=["train.steps=2"],
                        progress=False)
    a, b = (load_file(tmp_path / n / "last.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
