import json

import pytest

from modsquad.core.errors import CheckpointError, UserError
from modsquad.evaluate import evaluate
from modsquad.evaluate.evaluator import load_baseline, metrics_table, read_metrics
from modsquad.tasks import get_task
from modsquad.train import train

TASKS = ["depth_euclidean", "normal", "segment_semantic"]


@pytest.fixture(scope="module")
def runs(make_cfg, tmp_path_factory):
    """Two short runs that differ (2 vs 4 steps), to serve as model and baseline."""
    root = tmp_path_factory.mktemp("eval_runs")
    train(make_cfg(train={"steps": 4}), root / "a", progress=False)
    train(make_cfg(train={"steps": 2}, model={"name": "dense_vit_tiny"}), root / "b", progress=False)
    return root / "a", root / "b"


def test_eval_writes_metrics_json_with_every_task(runs):
    run, _ = runs
    result = evaluate(run, max_images=8)
    data = json.loads((run / "metrics.json").read_text())
    assert result["file"] == str(run / "metrics.json")
    assert data["split"] == "val" and data["num_images"] == 8 and data["step"] == 4
    assert data["checkpoint"].endswith("best.safetensors")
    assert set(data["metrics"]) == set(TASKS)
    for task in TASKS:
        assert set(data["metrics"][task]) == set(get_task(task).metrics)
        assert data["primary"][task] == get_task(task).primary
    assert "delta_m" not in data
    assert read_metrics(run) == data["metrics"]


def test_eval_other_split_gets_its_own_file(runs, tmp_path):
    run, _ = runs
    result = evaluate(run / "last.safetensors", split="test", max_images=4, out=tmp_path)
    assert result["file"] == str(tmp_path / "metrics_test.json") and result["split"] == "test"


def test_delta_m_against_a_baseline(runs, tmp_path):
    run, base = runs
    evaluate(base, max_images=8)
    same = evaluate(run, baseline=run, max_images=8, out=tmp_path / "same")
    assert same["delta_m"]["mean"] == pytest.approx(0.0)
    assert set(same["delta_m"]) == {*TASKS, "mean"}
    other = evaluate(run, baseline=base, max_images=8, out=tmp_path / "other")
    assert other["delta_m"]["mean"] != pytest.approx(0.0)
    # depth l1: lower is better, so a lower l1 than the baseline is a positive delta
    m, b = other["metrics"]["depth_euclidean"]["l1"], read_metrics(base)["depth_euclidean"]["l1"]
    assert other["delta_m"]["depth_euclidean"] == pytest.approx((b - m) / b * 100)
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["delta_m"] == other["delta_m"]
    table = metrics_table(other)
    assert table.row_count == len(TASKS)


def test_single_task_baselines_and_plain_json(runs, tmp_path):
    run, base = runs
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"normal": {"mean_angle": 40.0, "median_angle": 30.0}}))
    merged = load_baseline(base, {"normal": plain})
    assert merged["normal"] == {"mean_angle": 40.0, "median_angle": 30.0}
    assert merged["depth_euclidean"] == read_metrics(base)["depth_euclidean"]
    result = evaluate(run, baseline=base, task_baselines={"normal": plain}, max_images=8, out=tmp_path)
    m = result["metrics"]["normal"]["mean_angle"]
    assert result["delta_m"]["normal"] == pytest.approx((40.0 - m) / 40.0 * 100)


def test_eval_errors_are_user_errors(runs, tmp_path):
    run, _ = runs
    with pytest.raises(UserError, match="not found"):
        evaluate(run, baseline=tmp_path / "missing.json", max_images=4, out=tmp_path)
    with pytest.raises(CheckpointError):
        evaluate(tmp_path / "no_such_run")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "last.safetensors").write_bytes((run / "last.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.yaml"):
        evaluate(lone)


def test_a_trained_but_not_evaluated_baseline_gives_what_training_logged(runs, tmp_path):
    import shutil

    _, base = runs
    fresh = tmp_path / "fresh_base"
    shutil.copytree(base, fresh)
    (fresh / "metrics.json").unlink(missing_ok=True)
    logged = [json.loads(line) for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if r.get("kind") == "eval"][-1]
    assert load_baseline(fresh) == last_eval["metrics"]
    (fresh / "metrics.jsonl").unlink()  # nothing logged either: the message says what to run
    with pytest.raises(UserError, match="modsquad eval"):
        load_baseline(fresh)
