import json

from rich.console import Console

from modsquad.bench.report import human, markdown, primary_metric, summary_table, write_report


def test_human():
    assert human(438_080) == "438K"
    assert human(5_249_024) == "5.25M"
    assert human(12.3456) == "12.3"
    assert human(None) == "-"


def test_primary_metric_follows_task_spec():
    assert primary_metric("depth_euclidean", {"rmse": 2.0, "l1": 1.0}) == ("l1", 1.0)
    assert primary_metric("unknown_task", {"foo": 3.0}) == ("foo", 3.0)
    assert primary_metric("normal", {}) == (None, None)


def test_markdown_has_full_and_pruned_row_per_task(fake_result):
    md = markdown(fake_result)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * len(fake_result["tasks"]) + 1  # header, full + pruned per task, all tasks
    assert "| depth_euclidean | full | 438K" in md
    assert "151K (0.34x)" in md
    assert "Latency ms (b=1)" in md and "Throughput img/s (b=8)" in md
    assert "mean_angle 21.1" in md
    for key in fake_result["definitions"]:
        assert f"**{key}**" in md


def test_summary_table_renders(fake_result):
    console = Console(record=True, width=220)
    console.print(summary_table(fake_result))
    text = console.export_text()
    assert "segment_semantic" in text and "pruned" in text and "0.48x" in text


def test_write_report(tmp_path, fake_result):
    paths = write_report(fake_result, tmp_path / "bench")
    assert json.loads(paths["json"].read_text()) == fake_result
    assert paths["md"].read_text().startswith("# modsquad bench")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_metrics(tmp_path, fake_result):
    for entry in fake_result["tasks"].values():
        entry["metrics"] = {}
        entry["full"]["metrics"] = {}
    paths = write_report(fake_result, tmp_path)
    assert paths["png"].exists()
    assert "| normal | full |" in paths["md"].read_text()


def test_write_report_turns_nan_into_null(tmp_path, fake_result):
    fake_result["tasks"]["segment_semantic"]["metrics"]["miou"] = float("nan")
    paths = write_report(fake_result, tmp_path)
    assert json.loads(paths["json"].read_text())["tasks"]["segment_semantic"]["metrics"]["miou"] is None
    assert "miou nan" in paths["md"].read_text()
