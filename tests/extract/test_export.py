import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modsquad.core.errors import CheckpointError, ConfigError, UnknownNameError
from modsquad.extract import export as export_mod
from modsquad.extract.export import export_onnx, extract_model, write_extracted
from modsquad.extract.extracted import ExtractedModel, load_extracted
from modsquad.extract.usage import count_usage

from .conftest import random_images, write_checkpoint


@pytest.mark.parametrize("router,router_kwargs", [("per_task", {}), ("task_level", {"mode": "gumbel_st"})])
def test_onnx_parity_with_dynamic_batch_height_and_width(make_moe, images, tmp_path, router, router_kwargs):
    model = make_moe(router, router_kwargs, class_token=True)
    counts, _ = count_usage(model, [images])
    extracted = extract_model(model, "segment_semantic", counts["segment_semantic"])
    report = export_onnx(extracted, tmp_path / "model.onnx")
    assert report["max_abs_diff"] <= 1e-4 and report["sizes"] == [[32, 32], [64, 48]]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 3, "height", "width"]
    assert [d for d in session.get_outputs()[0].shape] == ["batch", 18, "height", "width"]
    # two sizes other than the built one (32 px): position embeddings are resampled inside the graph
    for n, h, w in ((5, 32, 32), (1, 48, 80), (2, 16, 16)):
        x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            expected = extracted(x).numpy()
        assert got.shape == expected.shape == (n, 18, h, w)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    meta = session.get_modelmeta().custom_metadata_map
    pre, out = json.loads(meta["modsquad.preprocessing"]), json.loads(meta["modsquad.output"])
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406]) and meta["channel_order"] == "RGB"
    assert pre["size_multiple"] == 16 and pre["input_size"] == [3, 32, 32] and pre["value_range"] == [0.0, 1.0]
    assert out["task"] == "segment_semantic" and out["class_names"][1] == "background" and meta["kind"] == "segmentation"


def test_config_json_says_what_goes_in_and_comes_out(make_moe, images, tmp_path):
    """config.json carries the preprocessing and the output's meaning; timm reads the model's pretrained_cfg."""
    from timm.data import resolve_data_config

    model = make_moe("per_task", input_norm="minus1_1")
    ckpt = write_checkpoint(tmp_path, model, images)
    write_extracted(ckpt, tmp_path / "out", tasks=["depth_euclidean"], usage=tmp_path, device="cpu")
    info = json.loads((tmp_path / "out" / "depth_euclidean" / "config.json").read_text())
    pre, out = info["preprocessing"], info["output"]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["channel_order"] == "RGB" and pre["layout"] == "NCHW" and pre["value_range"] == [0.0, 1.0]
    assert pre["input_size"] == [3, 32, 32] and pre["patch_size"] == 16 and "minus1_1" in pre["inside_model"]
    assert out["units"] == "m" and out["channels"] == 1 and out["kind"] == "regression"
    extracted = load_extracted(tmp_path / "out" / "depth_euclidean")
    data_cfg = resolve_data_config(model=extracted)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["mean"] == pytest.approx(pre["mean"])
    assert data_cfg["std"] == pytest.approx(pre["std"]) and data_cfg["interpolation"] == "bilinear"
    assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)


def test_hub_round_trip_through_a_local_folder(make_moe, images, tmp_path):
    """save_pretrained / from_pretrained (huggingface_hub mixin) with a local folder, no network."""
    model = make_moe("per_task")
    counts, _ = count_usage(model, [images])
    extracted = extract_model(model, "normal", counts["normal"])
    extracted.save_pretrained(tmp_path / "hub")
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "hub").iterdir()}
    back = ExtractedModel.from_pretrained(tmp_path / "hub")
    x = random_images(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back(x), extracted(x), rtol=0, atol=1e-6)
    assert back.info["output"]["task"] == "normal" and back.info["kept"] == extracted.info["kept"]
    # a folder written by `modsquad extract` loads the same way
    ckpt = write_checkpoint(tmp_path / "run", model, images)
    write_extracted(ckpt, tmp_path / "ext", tasks=["normal"], usage=tmp_path / "run", device="cpu")
    assert ExtractedModel.from_pretrained(tmp_path / "ext" / "normal").task == "normal"


def test_extract_writes_every_task(make_moe, images, tmp_path):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    results = write_extracted(ckpt, out, usage=tmp_path / "usage.json", device="cpu")
    assert sorted(results) == sorted(model.tasks)
    assert sorted(p.name for p in out.iterdir()) == sorted(model.tasks)  # no staging folders left
    for task, r in results.items():
        assert sorted(p.name for p in (out / task).iterdir()) == ["config.json", "model.safetensors"]
        info = json.loads((out / task / "config.json").read_text())
        assert info["selection"]["mode"] == "used" and info["task"] == task
        assert {n: layer["kept"] for n, layer in info["layers"].items()} == r["kept"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_leaves_output_untouched(make_moe, images, tmp_path, monkeypatch):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    write_extracted(ckpt, out, tasks=["normal"], usage=tmp_path, device="cpu")
    before = (out / "normal" / "model.safetensors").read_bytes()
    calls = []

    def flaky_export(extracted, path, **kw):
        calls.append(extracted.task)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {"file": "model.onnx", "max_abs_diff": 0.0}

    monkeypatch.setattr(export_mod, "export_onnx", flaky_export)
    with pytest.raises(RuntimeError, match="boom"):
        write_extracted(ckpt, out, tasks=["depth_euclidean", "normal"], threshold=0.3, usage=tmp_path, onnx=True,
                device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["normal"]  # depth_euclidean was staged, never published
    assert (out / "normal" / "model.safetensors").read_bytes() == before
    assert not (out / "normal" / "model.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rerun_replaces_a_task(make_moe, images, tmp_path):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    write_extracted(ckpt, out, tasks=["normal"], usage=tmp_path, device="cpu")
    exact = json.loads((out / "normal" / "config.json").read_text())
    write_extracted(ckpt, out, tasks=["normal"], usage=tmp_path, mass=0.5, device="cpu")
    smaller = json.loads((out / "normal" / "config.json").read_text())
    assert smaller["selection"]["mode"] == "mass" and smaller["params"]["extracted"] < exact["params"]["extracted"]
    assert sorted(p.name for p in out.iterdir()) == ["normal"]


def test_bad_arguments_write_nothing(make_moe, images, tmp_path):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    with pytest.raises(UnknownNameError, match="reshading"):
        write_extracted(ckpt, out, tasks=["reshading"], usage=tmp_path, device="cpu")
    with pytest.raises(ConfigError):
        write_extracted(ckpt, out, threshold=1.2, usage=tmp_path, device="cpu")
    other = tmp_path / "other"
    write_checkpoint(other, make_moe("per_task", seed=5), images)
    with pytest.raises(CheckpointError, match="another checkpoint"):
        write_extracted(ckpt, out, usage=other / "usage.json", device="cpu")
    assert not out.exists()


def test_dense_model_keeps_the_encoder(make_moe, images, tmp_path):
    model = make_moe("dense")
    ckpt = write_checkpoint(tmp_path, model)
    results = write_extracted(ckpt, tmp_path / "out", tasks=["depth_euclidean"], device="cpu")
    r = results["depth_euclidean"]
    assert r["kept"] == {} and r["max_abs_diff"] <= 1e-5
    assert r["params"]["extracted"] < r["params"]["full"]  # the other tasks' heads are gone
