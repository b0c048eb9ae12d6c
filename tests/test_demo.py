"""`modsquad demo` end to end at a reduced size (the CLI runs the same `run_demo`)."""

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from modsquad.bench.bench import FIELDS
from modsquad.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from modsquad.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    console = Console(record=True, width=250)  # wide enough that no artefact path wraps
    result = run_demo(out, quick=True, threads=1, console=console)
    return result, console.export_text()


def test_demo_writes_every_artefact(demo_run):
    result, text = demo_run
    for name, path in result.artefacts.items():
        assert path.exists(), name
        assert str(path) in text.replace("\n", "")  # the final panel says where each artefact is
    assert len(result.metrics["metrics"]) >= 4
    for task in result.metrics["metrics"]:
        assert (result.out / "extracted" / task / "model.safetensors").is_file()
    assert (result.out / "usage" / "usage.png").is_file()
    assert "extracted/full" in text and "wall time" in text


def test_demo_bench_json_is_complete_and_consistent(demo_run):
    result, _ = demo_run
    bench = json.loads((result.out / "bench" / "bench.json").read_text())
    assert set(bench["tasks"]) == set(result.metrics["metrics"])
    for field in FIELDS:
        assert bench["full"][field] > 0
    for task, entry in bench["tasks"].items():
        assert entry["metrics"] and entry["full"]["metrics"], task
        assert entry["max_abs_diff"] >= 0
        for field in FIELDS:
            assert entry[field] > 0 and entry["full"][field] > 0, (task, field)
            assert entry["ratios"][field] == pytest.approx(entry[field] / entry["full"][field])
        # the extracted model is smaller than the full model run for its task, let alone the whole model
        assert entry["params"] < entry["full"]["params"] < bench["full"]["params"]
        assert entry["flops"] < bench["full"]["flops"]


def test_demo_cli_rejects_bad_options(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--size", "30"])
    assert res.exit_code == 2
    assert "size" in res.output


def test_demo_never_deletes_a_foreign_run_folder(tmp_path):
    from modsquad.core.errors import ConfigError
    from modsquad.demo import run_demo

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a modsquad run"):
        run_demo(tmp_path, quick=True, console=Console(quiet=True))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
