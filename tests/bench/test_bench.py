import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

from modsquad.bench.bench import (
    LiveTensorTracker,
    count_flops,
    count_params,
    dense_timm_baseline,
    fixed_threads,
    module_bytes,
    peak_memory_mb,
    ratios,
    repeat_to_batch,
    task_param_count,
    time_interleaved,
)
from modsquad.models import create_model


def test_count_params_timm_mlp():
    mlp = Mlp(32, 64, 16)
    assert count_params(mlp) == 32 * 64 + 64 + 64 * 16 + 16
    assert module_bytes(mlp) == 4 * count_params(mlp)


def test_count_flops_timm_mlp():
    mlp = Mlp(32, 64, 16)
    x = torch.randn(2, 5, 32)
    assert count_flops(mlp, x) == 2 * 2 * 5 * (32 * 64 + 64 * 16)


def test_count_flops_counts_attention_on_cpu():
    attn = Attention(64, num_heads=4)
    b, n, d = 1, 16, 64
    proj = 2 * b * n * d * 3 * d + 2 * b * n * d * d
    scores_and_values = 2 * 2 * b * n * n * d  # q @ k^T and attn @ v over all heads
    assert count_flops(attn, torch.randn(b, n, d)) == proj + scores_and_values


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="no grouped_mm in this torch")
def test_count_flops_counts_grouped_mm():
    x, w = torch.randn(10, 16), torch.randn(3, 16, 8)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    try:
        F.grouped_mm(x, w, offs=offs)
    except Exception:
        pytest.skip("grouped_mm does not run on this device")
    assert count_flops(lambda t: F.grouped_mm(t, w, offs=offs), x) == 2 * 10 * 16 * 8


def test_task_param_count_keeps_shared_parts_and_own_rows():
    tasks = ["depth_euclidean", "normal", "edge_texture"]
    model = create_model("modsquad_vit_tiny", tasks=tasks, img_size=32)
    named = dict(model.named_parameters())
    per_task_rows = sum(p.numel() for n, p in named.items() if n == "task_embed" or n.endswith("router.weight"))
    assert per_task_rows > 0
    for task in tasks:
        other_heads = sum(count_params(model.heads[t]) for t in tasks if t != task)
        expected = count_params(model) - other_heads - per_task_rows * (len(tasks) - 1) // len(tasks)
        assert task_param_count(model, task) == expected
    single = create_model("modsquad_vit_tiny", tasks=["normal"], img_size=32)
    assert task_param_count(single, "normal") == count_params(single)


def test_live_tensor_tracker_sees_activations():
    mlp = Mlp(32, 256).eval()
    x = torch.randn(8, 10, 32)
    with torch.inference_mode(), LiveTensorTracker() as tracker:
        y = mlp(x)
        hidden = 8 * 10 * 256 * 4
        assert tracker.peak >= 2 * hidden  # fc1 output and GELU output are alive together
        assert tracker.current == y.numel() * 4
        del y
        assert tracker.current == 0


def test_peak_memory_counts_weights_input_and_activations():
    mlp = Mlp(32, 256).eval()
    x = torch.randn(8, 10, 32)
    static = (module_bytes(mlp) + x.numel() * 4) / 2**20
    peak = peak_memory_mb(mlp, mlp, x)
    assert static + 2 * 8 * 10 * 256 * 4 / 2**20 <= peak < static + 1.0


def test_time_interleaved_alternates_and_rotates():
    calls = []
    fns = {name: (lambda x, name=name: calls.append(name)) for name in ("full", "extracted", "other")}
    rounds = []
    times = time_interleaved(fns, torch.zeros(1), repeats=3, warmup=2, on_round=lambda: rounds.append(1))
    assert {k: len(v) for k, v in times.items()} == {"full": 3, "extracted": 3, "other": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    timed = calls[2 * 3:]
    assert timed == ["full", "extracted", "other", "extracted", "other", "full", "other", "full", "extracted"]
    assert len(rounds) == 3
    with pytest.raises(ValueError):
        time_interleaved(fns, torch.zeros(1), repeats=0)


def test_ratios_and_helpers():
    assert ratios({"params": 5, "latency_ms": 1.0}, {"params": 10, "latency_ms": 0.0}) == \
        {"params": 0.5, "latency_ms": None}
    imgs = torch.arange(3.0).view(3, 1, 1, 1)
    assert repeat_to_batch(imgs, 5).flatten().tolist() == [0, 1, 2, 0, 1]
    before = torch.get_num_threads()
    with fixed_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_dense_timm_baseline_matches_model_shape():
    from timm.models.vision_transformer import VisionTransformer

    tasks = ["normal", "segment_semantic", "class_object"]
    model = create_model("modsquad_vit_tiny", tasks=tasks, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    for task in tasks:
        dense = dense_timm_baseline(model, task)
        assert isinstance(dense.encoder, VisionTransformer) and not dense.training
        assert len(dense.encoder.blocks) == model.config["depth"] and dense.encoder.num_prefix_tokens == 0
        assert dense.encoder.blocks[0].attn.num_heads == model.config["num_heads"]
        assert dense.encoder.blocks[0].mlp.fc1.out_features == model.config["mlp_ratio"] * model.config["embed_dim"]
        assert type(dense.head) is type(model.heads[task])
        with torch.no_grad():
            assert dense(x).shape == model(x, tasks=[task])[task].shape
    assert torch.equal(torch.get_rng_state(), rng)  # random weights without touching the global RNG
    wide = dense_timm_baseline(model, "normal", img_size=(48, 32))
    assert wide(torch.randn(1, 3, 48, 32)).shape == (1, 3, 48, 32)


def _check_schema(result, tasks, dense=True):
    from modsquad.bench.bench import FIELDS

    assert list(result["tasks"]) == tasks
    assert {"device", "torch", "batch_sizes", "repeats", "warmup", "threads", "definitions"} <= set(result)
    for field in FIELDS:
        assert result["full"][field] > 0
    for task, entry in result["tasks"].items():
        for field in FIELDS:
            assert entry[field] > 0, (task, field)
            assert entry["full"][field] > 0, (task, field)
            # ratios come from the figures of this same run
            assert entry["ratios"][field] == pytest.approx(entry[field] / entry["full"][field])
        assert entry["max_abs_diff"] >= 0
        assert ("dense_timm" in entry) is dense
        assert ("extracted_vs_dense" in entry["ratios"] and "full_vs_dense" in entry["ratios"]) is dense
        assert ("dense_timm" in result["definitions"]) is dense
        if dense:
            base = entry["dense_timm"]
            assert set(base) == set(FIELDS)  # cost only, no metrics
            for field in FIELDS:
                assert base[field] > 0, (task, field)
                assert entry["ratios"]["extracted_vs_dense"][field] == pytest.approx(entry[field] / base[field])
                assert entry["ratios"]["full_vs_dense"][field] == pytest.approx(entry["full"][field] / base[field])


def test_benchmark_with_val_metrics(tiny_run, tmp_path):
    from modsquad.bench import benchmark, write_report
    from modsquad.checkpoint import load_model
    from modsquad.tasks import get_task

    run, extracted, tasks = tiny_run
    result = benchmark(run, extracted, batch_sizes=(1, 2), repeats=2, warmup=1, max_images=4, threads=1)
    _check_schema(result, tasks)
    assert result["threads"] == 1 and result["batch_sizes"] == {"latency": 1, "throughput": 2}
    assert result["data"]["images"] == 4 and result["data"]["split"] == "val"
    assert set(result["full"]["metrics"]) == set(tasks)
    model = load_model(run)
    for task, entry in result["tasks"].items():
        spec = get_task(task)
        assert spec.primary in entry["metrics"] and spec.primary in entry["full"]["metrics"]
        assert entry["params"] < entry["full"]["params"] < result["full"]["params"]  # mass 0.5 drops experts
        assert entry["dense_timm"]["params"] == count_params(dense_timm_baseline(model, task))
        # usage was counted on the training split, so the val images are held out; mass 0.5 drops experts
        # that some held-out tokens choose: coverage is measured, below 1
        cover = entry["heldout_coverage"]
        assert cover["split"] == "val" and cover["usage_split"] == "train" and cover["held_out"] is True
        assert cover["images"] == 4 and 0.0 <= cover["tokens_covered"] <= cover["coverage"] < 1.0
    assert "heldout_coverage" in result["definitions"]
    paths = write_report(result, tmp_path)
    assert all(p.is_file() for p in paths.values())


def test_benchmark_without_data_and_task_subset(tiny_run):
    from modsquad.bench import benchmark

    run, extracted, _ = tiny_run
    result = benchmark(run / "last.safetensors", extracted, tasks=["normal"], batch_sizes=(2,), repeats=1,
                       warmup=0, max_images=0, dense_baseline=False)
    _check_schema(result, ["normal"], dense=False)
    assert result["data"] is None and result["tasks"]["normal"]["metrics"] == {}
    assert result["tasks"]["normal"]["heldout_coverage"] is None  # no images to measure it on
    assert result["batch_sizes"] == {"latency": 2, "throughput": 2}


def test_benchmark_user_errors(tiny_run, tmp_path):
    from modsquad.bench import benchmark
    from modsquad.core.errors import CheckpointError, ConfigError, UnknownNameError

    run, extracted, _ = tiny_run
    with pytest.raises(CheckpointError, match="not found"):
        benchmark(run, tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no extracted model"):
        benchmark(run, tmp_path)
    with pytest.raises(UnknownNameError, match="reshading"):
        benchmark(run, extracted, tasks=["reshading"])
    with pytest.raises(ConfigError, match="batch"):
        benchmark(run, extracted, batch_sizes=(1, 2, 3))
    from modsquad.checkpoint import load_model, save_model

    other = load_model(run)
    with torch.no_grad():
        other.task_embed.add_(1.0)
    save_model(tmp_path / "other.safetensors", other)
    with pytest.raises(CheckpointError, match="was extracted from"):
        benchmark(tmp_path / "other.safetensors", extracted)


def test_bench_cli(tiny_run, tmp_path):
    import json

    from typer.testing import CliRunner

    from modsquad.cli import app

    run, extracted, tasks = tiny_run
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", str(run), "--extracted", str(extracted), "--out", str(out),
                                   "--batch", "1,2", "--repeats", "1", "--warmup", "0", "--max-images", "2",
                                   "--threads", "1", "--tasks", "normal,depth_euclidean"])
    assert res.exit_code == 0, res.output
    assert "extracted/full" in res.output and "extracted/dense" in res.output and "bench.md" in res.output
    assert list(json.loads((out / "bench.json").read_text())["tasks"]) == ["normal", "depth_euclidean"]
    res = CliRunner().invoke(app, ["bench", str(run), "--extracted", str(extracted), "--out", str(out),
                                   "--batch", "1", "--repeats", "1", "--warmup", "0", "--max-images", "0",
                                   "--tasks", "normal", "--no-dense-baseline"])
    assert res.exit_code == 0, res.output
    assert "extracted/full" in res.output and "dense" not in res.output
    assert "dense_timm" not in json.loads((out / "bench.json").read_text())["tasks"]["normal"]
    bad = CliRunner().invoke(app, ["bench", str(run), "--extracted", str(extracted), "--batch", "0"])
    assert bad.exit_code == 2 and "--batch" in bad.output
