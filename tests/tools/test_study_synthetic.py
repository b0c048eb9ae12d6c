"""`tools/study_synthetic.py --quick`: the whole study pipeline (router runs, compare, add a task, few-shot) on a
tiny suite, in-process."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("study_synthetic", REPO / "tools" / "study_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_quick_smoke(tmp_path):
    study = _load_tool()
    report = study.main(["--quick", "--out", str(tmp_path / "study")])
    text = report.read_text()
    assert "## Routers vs the dense baseline" in text and "| per_task_mi | per_task +MI |" in text
    assert "within float rounding (rtol 1e-5, val images): **yes**" in text
    assert "## Few-shot transfer" in text and "| 4 |" in text
    for name in ("study_compare.png", "study_usage_mi.png", "study_add_task.png"):
        assert (report.parent / name).read_bytes()[:4] == b"\x89PNG", name
    # a rerun reuses the evaluated runs
    assert study.main(["--quick", "--out", str(tmp_path / "study")]) == report
