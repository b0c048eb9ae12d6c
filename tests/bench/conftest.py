"""Fixtures for the bench tests: a fake bench result shaped like `modsquad.bench.benchmark` returns."""

from __future__ import annotations

import pytest

from modsquad.bench.bench import DEFINITIONS, ratios


def _entry(params, flops, latency_ms, throughput, peak_mem_mb, metrics):
    return dict(params=params, flops=flops, latency_ms=latency_ms, throughput=throughput,
                peak_mem_mb=peak_mem_mb, metrics=metrics)


@pytest.fixture
def fake_result() -> dict:
    """Three tasks, each with full, extracted and dense timm figures and their ratios."""
    tasks = {}
    for name, metrics_full, metrics_extracted in [
        ("depth_euclidean", {"l1": 0.21, "rmse": 0.34}, {"l1": 0.21, "rmse": 0.34}),
        ("normal", {"mean_angle": 21.0, "median_angle": 18.0}, {"mean_angle": 21.1, "median_angle": 18.0}),
        ("segment_semantic", {"miou": 40.0, "pixel_acc": 80.0}, {"miou": 0.0, "pixel_acc": 79.5}),
    ]:
        full = _entry(438_080, 5_249_024, 2.5, 900.0, 10.8, metrics_full)
        extracted = _entry(151_000, 2_100_000, 1.2, 2100.0, 4.1, metrics_extracted)
        dense = {k: v for k, v in _entry(290_000, 7_340_032, 2.0, 1000.0, 9.5, {}).items() if k != "metrics"}
        tasks[name] = {**extracted, "full": full, "max_abs_diff": 1.5e-6, "dense_timm": dense,
                       "ratios": {**ratios(extracted, full), "extracted_vs_dense": ratios(extracted, dense),
                                  "full_vs_dense": ratios(full, dense)}}
    return {
        "device": "cpu", "device_name": "test cpu", "torch": "2.x", "threads": 2,
        "checkpoint": "runs/x/best.safetensors", "extracted": "out/extracted",
        "batch_sizes": {"latency": 1, "throughput": 8}, "repeats": 5, "warmup": 1,
        "data": {"root": "data/synthetic", "split": "val", "images": 8},
        "full": {**_entry(479_680, 19_267_584, 6.0, 300.0, 20.0, {t: {} for t in tasks}), "tasks": list(tasks)},
        "tasks": tasks,
        "definitions": DEFINITIONS,
    }


@pytest.fixture
def fake_result_no_dense(fake_result) -> dict:
    """fake_result as `benchmark(..., dense_baseline=False)` returns it."""
    for entry in fake_result["tasks"].values():
        del entry["dense_timm"], entry["ratios"]["extracted_vs_dense"], entry["ratios"]["full_vs_dense"]
    fake_result["definitions"] = {k: v for k, v in DEFINITIONS.items() if k != "dense_timm"}
    return fake_result


BENCH_TASKS = ["depth_euclidean", "normal", "segment_semantic"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run dir, extracted dir, tasks): a run directory (config.yaml, last.safetensors) of an untrained tiny
    model, a synthetic suite for its val split, and every task extracted with half the routing mass (so
    experts are really dropped)."""
    import torch

    from modsquad.checkpoint import save_model
    from modsquad.config import load_config, save_config
    from modsquad.data import synthesize
    from modsquad.demo import config_path
    from modsquad.extract import write_extracted
    from modsquad.models import create_model

    tmp = tmp_path_factory.mktemp("bench_run")
    synthesize(tmp / "data", images=12, size=32, seed=0)
    cfg = load_config(config_path(), [f"data.root={tmp / 'data'}", "model.img_size=32",
                                      f"model.tasks=[{','.join(BENCH_TASKS)}]"])
    run = tmp / "run"
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = create_model("modsquad_vit_tiny", tasks=BENCH_TASKS, img_size=32)
    for _, layer in model.moe_layers():  # random gates: routing that differs between tasks
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    save_model(run / "last.safetensors", model)
    write_extracted(run, tmp / "extracted", mass=0.5, device="cpu")
    return run, tmp / "extracted", BENCH_TASKS
