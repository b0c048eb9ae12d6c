import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modsquad.checkpoint import load_model, read_metadata, read_model_config, read_state_dict, save_model
from modsquad.core.atomic import atomic_path, atomic_write
from modsquad.core.errors import CheckpointError
from modsquad.models import create_model

TASKS = ["depth_euclidean", "normal", "class_scene"]


def _tiny(**overrides):
    return create_model("modsquad_vit_tiny", TASKS, img_size=32, depth=2, embed_dim=32, num_heads=2,
                        attn_head_dim=16, mlp_expert_hidden=32, **overrides)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trained(images):
    """A tiny model with non-zero gates and some usage counts, as after training."""
    model = _tiny(attn_experts=[4, 6])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model(images)
    return model.eval()


def test_round_trip_reproduces_outputs(tmp_path, trained, images):
    path = save_model(tmp_path / "last.safetensors", trained, extra={"step": 12, "note": "hello"})
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == trained.config and loaded.config["name"] == "modsquad_vit_tiny"
    assert loaded.expert_usage() == trained.expert_usage()
    with torch.no_grad():
        ref, out = trained(images), loaded(images)
    for task in TASKS:
        assert torch.equal(ref[task], out[task])
    meta = read_metadata(path)
    assert meta["format"] == "modsquad" and meta["step"] == "12" and meta["note"] == "hello"
    assert read_model_config(path) == trained.config
    assert set(read_state_dict(path)) == set(trained.state_dict())
    assert os.listdir(tmp_path) == ["last.safetensors"]


def test_run_dir_prefers_best(tmp_path, trained):
    save_model(tmp_path / "last.safetensors", trained, extra={"which": "last"})
    assert read_metadata(tmp_path)["which"] == "last"
    save_model(tmp_path / "best.safetensors", trained, extra={"which": "best"})
    assert read_metadata(tmp_path)["which"] == "best"
    assert isinstance(load_model(tmp_path), nn.Module)


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: checkpoint not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no best.safetensors or last.safetensors"):
        load_model(tmp_path)


def test_corrupt_and_truncated(tmp_path, trained):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model(garbage)
    path = save_model(tmp_path / "cut.safetensors", trained)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_model(path)


def test_not_a_modsquad_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="other.safetensors: not a modsquad checkpoint"):
        load_model(path)


def test_weights_do_not_match_config(tmp_path, trained):
    other = _tiny(attn_experts=[4, 4])
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path),
              metadata={"format": "modsquad", "model_config": json.dumps(trained.config)})
    with pytest.raises(CheckpointError, match="mixed.safetensors: weights do not match"):
        load_model(path)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("heads.normal")}
    save_file(state, str(path), metadata={"format": "modsquad", "model_config": json.dumps(trained.config)})
    with pytest.raises(CheckpointError, match="missing heads.normal"):
        load_model(path)


def test_bad_stored_config(tmp_path, trained):
    path = tmp_path / "cfg.safetensors"
    config = {**trained.config, "router": "nonsense"}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "modsquad", "model_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="cfg.safetensors: stored model config cannot be built"):
        load_model(path)


class _Tied(nn.Module):
    """Tied and strided parameters, which safetensors refuses as they are."""

    def __init__(self):
        super().__init__()
        self.config = {"name": "tied"}
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("t", torch.arange(12.).view(3, 4).t())


def test_shared_and_strided_tensors_are_saved(tmp_path):
    model = _Tied()
    path = save_model(tmp_path / "tied.safetensors", model)
    state = read_state_dict(path)
    assert torch.equal(state["a.weight"], state["b.weight"])
    assert torch.equal(state["t"], model.t)


def test_atomic_write_leaves_nothing_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"

    def failing(p):
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert os.listdir(tmp_path) == []

    atomic_write(target, lambda p: p.write_text("v1"))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("v2 partial")
            raise RuntimeError("crash")
    assert target.read_text() == "v1"
    assert os.listdir(tmp_path) == ["out.json"]


def test_save_failure_keeps_previous_checkpoint(tmp_path, trained, monkeypatch):
    path = save_model(tmp_path / "last.safetensors", trained, extra={"step": 1})
    import modsquad.checkpoint as ckpt

    def boom(state, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("no space left")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_model(path, trained, extra={"step": 2})
    assert read_metadata(path)["step"] == "1"
    assert os.listdir(tmp_path) == ["last.safetensors"]
