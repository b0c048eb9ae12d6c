import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modsquad.errors import CheckpointError, ConfigError, UnknownNameError
from modsquad.extract import export as export_mod
from modsquad.extract.export import export_onnx, extract, extract_standalone
from modsquad.extract.usage import count_usage

from .conftest import random_images, write_checkpoint


@pytest.mark.parametrize("router,router_kwargs", [("per_task", {}), ("task_conditioned", {}),
                                                  ("task_level", {"mode": "gumbel_st"})])
def test_onnx_parity_with_dynamic_batch(make_moe, images, tmp_path, router, router_kwargs):
    model = make_moe(router, router_kwargs)
    counts, _ = count_usage(model, [images])
    sub = extract_standalone(model, "segment_semantic", counts["segment_semantic"])
    report = export_onnx(sub, tmp_path / "model.onnx")
    assert report["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = random_images(5, seed=7)
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        expected = sub(x).numpy()
    assert got.shape == expected.shape == (5, 18, 32, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_extract_writes_every_task(make_moe, images, tmp_path):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    results = extract(ckpt, out, usage=tmp_path / "usage.json", device="cpu")
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
    extract(ckpt, out, tasks=["normal"], usage=tmp_path, device="cpu")
    before = (out / "normal" / "model.safetensors").read_bytes()
    calls = []

    def flaky_export(sub, path, **kw):
        calls.append(sub.task)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {"file": "model.onnx", "max_abs_diff": 0.0}

    monkeypatch.setattr(export_mod, "export_onnx", flaky_export)
    with pytest.raises(RuntimeError, match="boom"):
        extract(ckpt, out, tasks=["depth_euclidean", "normal"], threshold=0.3, usage=tmp_path, onnx=True,
                device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["normal"]  # depth_euclidean was staged, never published
    assert (out / "normal" / "model.safetensors").read_bytes() == before
    assert not (out / "normal" / "model.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rerun_replaces_a_task(make_moe, images, tmp_path):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    extract(ckpt, out, tasks=["normal"], usage=tmp_path, device="cpu")
    exact = json.loads((out / "normal" / "config.json").read_text())
    extract(ckpt, out, tasks=["normal"], usage=tmp_path, mass=0.5, device="cpu")
    pruned = json.loads((out / "normal" / "config.json").read_text())
    assert pruned["selection"]["mode"] == "mass" and pruned["params"]["extracted"] < exact["params"]["extracted"]
    assert sorted(p.name for p in out.iterdir()) == ["normal"]


def test_bad_arguments_write_nothing(make_moe, images, tmp_path):
    model = make_moe("per_task")
    ckpt = write_checkpoint(tmp_path, model, images)
    out = tmp_path / "out"
    with pytest.raises(UnknownNameError, match="reshading"):
        extract(ckpt, out, tasks=["reshading"], usage=tmp_path, device="cpu")
    with pytest.raises(ConfigError):
        extract(ckpt, out, threshold=1.2, usage=tmp_path, device="cpu")
    other = tmp_path / "other"
    write_checkpoint(other, make_moe("per_task", seed=5), images)
    with pytest.raises(CheckpointError, match="another checkpoint"):
        extract(ckpt, out, usage=other / "usage.json", device="cpu")
    assert not out.exists()


def test_dense_model_keeps_the_encoder(make_moe, images, tmp_path):
    model = make_moe("dense")
    ckpt = write_checkpoint(tmp_path, model)
    results = extract(ckpt, tmp_path / "out", tasks=["depth_euclidean"], device="cpu")
    r = results["depth_euclidean"]
    assert r["kept"] == {} and r["max_abs_diff"] <= 1e-5
    assert r["params"]["extracted"] < r["params"]["full"]  # the other tasks' heads are gone
