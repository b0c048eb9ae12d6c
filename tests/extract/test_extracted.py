import json

import pytest
import torch

import modsquad
from modsquad.core.errors import CheckpointError
from modsquad.extract.export import write_extracted
from modsquad.extract.extracted import ExtractedModel, load_extracted
from modsquad.moe import FoldedMoEAttention, MoEAttention

from .conftest import write_checkpoint


@pytest.fixture
def extracted(make_moe, images, tmp_path):
    """(full model, directory of its extracted `normal` task) for a per_task model."""
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    write_extracted(ckpt, tmp_path / "out", tasks=["normal"], usage=tmp_path / "usage.json", device="cpu")
    return model, tmp_path / "out" / "normal"


def test_load_extracted_needs_only_its_directory(extracted, images, tmp_path):
    model, folder = extracted
    (tmp_path / "last.safetensors").unlink()  # the source checkpoint is gone
    loaded = modsquad.load_extracted(folder)
    assert isinstance(loaded, ExtractedModel) and not loaded.training and loaded.task == "normal"
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images)["normal"], atol=1e-5, rtol=0)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    info = json.loads((folder / "config.json").read_text())
    assert info["task_spec"]["channels"] == 3 and info["source"]["sha256"]
    assert set(info["layers"]) == {n for n, _ in model.moe_layers()}
    assert info["params"]["extracted"] < info["params"]["full"]
    assert info["check_images"]["kind"].startswith("random")  # no data: measured on random images


def test_truncated_weights(extracted):
    _, folder = extracted
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_extracted(folder)


def test_weights_of_another_task(extracted, make_moe, images, tmp_path):
    _, folder = extracted
    other = tmp_path / "other"
    write_checkpoint(other, make_moe("per_task", seed=3), images)
    write_extracted(other / "last.safetensors", other / "out", tasks=["depth_euclidean"], usage=other, device="cpu")
    (folder / "model.safetensors").write_bytes((other / "out" / "depth_euclidean" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        load_extracted(folder)
    info = json.loads((folder / "config.json").read_text())
    info["weights_sha256"] = json.loads((other / "out" / "depth_euclidean" / "config.json").read_text())[
        "weights_sha256"]
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="metadata"):
        load_extracted(folder)


@pytest.mark.parametrize("edit", ["garbage", "format", "missing_field", "architecture"])
def test_bad_config(extracted, edit):
    _, folder = extracted
    path = folder / "config.json"
    info = json.loads(path.read_text())
    if edit == "garbage":
        path.write_text("{")
    else:
        if edit == "format":
            info["format"] = "something-else"
        elif edit == "missing_field":
            del info["model_config"]
        else:
            info["model_config"]["embed_dim"] = 48
        path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError):
        load_extracted(folder)


def test_not_an_extracted_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_extracted(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_extracted(tmp_path)


def test_folded_attention_matches_moe_attention():
    """A one-task MoA layer whose every token uses experts (2, 0) with weights (.7, .3) is multi-query attention."""
    torch.manual_seed(0)
    moa = MoEAttention(16, 8, num_experts=4, top_k=2, num_tasks=1, router="task_level").eval()
    with torch.no_grad():
        moa.router.task_logits.copy_(torch.tensor([[0.0, -10.0, 0.8473, -10.0]]))  # softmax(.8473, 0) = (.7, .3)
    folded = moa.fold()
    assert isinstance(folded, FoldedMoEAttention) and folded.num_heads == 2
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(folded(x), moa(x, 0), atol=1e-6, rtol=0)


def test_an_edited_config_is_caught(extracted):
    """The weights carry the config's sha256: another top_k in config.json must not load silently."""
    _, folder = extracted
    path = folder / "config.json"
    info = json.loads(path.read_text())
    info["model_config"]["mlp_top_k"] = 1
    path.write_text(json.dumps(info, indent=1))
    with pytest.raises(CheckpointError, match="edited after extraction"):
        load_extracted(folder)
