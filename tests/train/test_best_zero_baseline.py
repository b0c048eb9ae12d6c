"""best.safetensors is written even when a task's primary metric is 0 at the first evaluation (the reference of
the run's delta_m score): such tasks are left out of the score's mean and named in the log as score_skips."""

import json

from modsquad.checkpoint import read_metadata
from modsquad.train import trainer as trainer_module
from modsquad.train.trainer import train

TASKS = ["depth_euclidean", "normal", "segment_semantic"]


def _scripted_metrics(values):
    """An evaluate_model stand-in that returns segment_semantic mIoU values[i] at the i-th evaluation."""
    calls = iter(values)

    def fake(*args, **kwargs):
        miou = next(calls)
        return {"depth_euclidean": {"l1": 1.0, "rmse": 1.0}, "normal": {"mean_angle": 40.0},
                "segment_semantic": {"miou": miou, "pixel_acc": 50.0}}

    return fake


def test_zero_reference_still_writes_best(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "evaluate_model", _scripted_metrics([0.0, 10.0, 5.0]))
    cfg = make_cfg(train={"steps": 3, "eval_every": 1, "log_every": 1})
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [e["score_skips"] for e in evals] == [["segment_semantic"]] * 3
    assert all(e["score"] == 0.0 for e in evals)  # the other tasks are unchanged: delta 0, never NaN
    assert evals[0]["best"] and (out / "best.safetensors").is_file()
    assert int(read_metadata(out / "best.safetensors")["step"]) == 1
    assert set(TASKS) == set(evals[0]["metrics"])
