import json

import pytest
from rich.console import Console

from modsquad.bench.report import human, markdown, metric_change, primary_metric, summary_table, write_report


def test_human():
    assert human(438_080) == "438K"
    assert human(5_249_024) == "5.25M"
    assert human(12.3456) == "12.3"
    assert human(None) == "-"


def test_primary_metric_follows_task_spec():
    assert primary_metric("depth_euclidean", {"rmse": 2.0, "l1": 1.0}) == ("l1", 1.0)
    assert primary_metric("unknown_task", {"foo": 3.0}) == ("foo", 3.0)
    assert primary_metric("normal", {}) == (None, None)


def test_markdown_has_full_extracted_and_dense_rows_per_task(fake_result):
    md = markdown(fake_result)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    # header; per task full, extracted, dense timm, extracted / dense, full / dense; all tasks
    assert len(rows) == 1 + 5 * len(fake_result["tasks"]) + 1
    assert "|  | dense timm | 290K | 7.34M | 2.00 | 1000.0 | 9.50 | - |" in md
    assert "|  | extracted / dense | 0.52x | 0.29x | 0.60x | 2.10x | 0.43x |" in md
    assert "|  | full / dense | 1.51x | 0.72x | 1.25x | 0.90x | 1.14x |" in md
    assert "dense timm: the baseline" in md and "extracted vs full vs dense timm" in md
    assert "| depth_euclidean | full | 438K" in md
    assert "151K (0.34x)" in md
    assert "Latency ms (b=1)" in md and "Throughput img/s (b=8)" in md
    assert "mean_angle 21.1" in md
    for key in fake_result["definitions"]:
        assert f"**{key}**" in md


def test_old_bench_json_key_still_renders(fake_result):
    """bench.json files written before the rename hold "pruned_vs_dense"; they render like new ones."""
    new_md, new_table = markdown(fake_result), _render(summary_table(fake_result))
    for entry in fake_result["tasks"].values():
        entry["ratios"]["pruned_vs_dense"] = entry["ratios"].pop("extracted_vs_dense")
    assert markdown(fake_result) == new_md and _render(summary_table(fake_result)) == new_table
    assert "|  | extracted / dense | 0.52x |" in new_md


def test_markdown_without_dense_baseline(fake_result_no_dense):
    md = markdown(fake_result_no_dense)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * len(fake_result_no_dense["tasks"]) + 1  # header, full + extracted per task, all
    assert "dense" not in md


def _render(table, width=220) -> str:
    console = Console(record=True, width=width)
    console.print(table)
    return console.export_text()


def test_summary_table_renders(fake_result):
    text = _render(summary_table(fake_result))
    assert "segment_semantic" in text and "extracted" in text and "0.48x" in text
    assert "dense timm" in text and "extracted/dense" in text and "full/dense" in text
    assert "0.29x" in text and "0.72x" in text  # FLOPs extracted / dense and full / dense
    narrow = _render(summary_table(fake_result), width=80)
    assert "…" not in narrow and "full/dense" in narrow  # fits 80 columns without cutting cells


def test_summary_table_without_dense_baseline(fake_result_no_dense):
    text = _render(summary_table(fake_result_no_dense))
    assert "extracted/full" in text and "dense" not in text


def test_write_report(tmp_path, fake_result):
    paths = write_report(fake_result, tmp_path / "bench")
    assert json.loads(paths["json"].read_text()) == fake_result
    assert paths["md"].read_text().startswith("# modsquad bench")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_dense_baseline(tmp_path, fake_result_no_dense):
    paths = write_report(fake_result_no_dense, tmp_path)
    assert json.loads(paths["json"].read_text()) == fake_result_no_dense
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


def test_metric_change_is_relative_to_full_and_positive_when_better(fake_result):
    tasks = fake_result["tasks"]
    assert metric_change("segment_semantic", tasks["segment_semantic"]) == ("miou", 40.0, 0.0, -100.0)
    name, full, extracted, change = metric_change("normal", tasks["normal"])  # mean_angle: lower is better
    assert name == "mean_angle" and change == pytest.approx(-100 * 0.1 / 21.0)
    assert metric_change("depth_euclidean", tasks["depth_euclidean"])[3] == 0.0
    tasks["normal"]["metrics"] = {}
    assert metric_change("normal", tasks["normal"])[3] is None
