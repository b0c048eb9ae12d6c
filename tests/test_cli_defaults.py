"""Default output folders lie under the run the command reads, never in the current folder: the library calls are
replaced by recorders, so only the paths the CLI hands them are checked."""

import pytest
from typer.testing import CliRunner

import modsquad.bench
import modsquad.extract.export
from modsquad.cli import app


@pytest.fixture
def calls(monkeypatch, tmp_path):
    seen = {}

    def write_extracted(checkpoint, out, **kwargs):
        seen["extract"] = out
        raise SystemExit(0)

    def benchmark(checkpoint, extracted, **kwargs):
        seen["bench extracted"] = extracted
        return {}

    def write_report(result, out):
        seen["bench"] = out
        raise SystemExit(0)

    monkeypatch.setattr(modsquad.extract.export, "write_extracted", write_extracted)
    monkeypatch.setattr(modsquad.bench, "benchmark", benchmark)
    monkeypatch.setattr(modsquad.bench, "write_report", write_report)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "last.safetensors").write_bytes(b"")
    return seen


@pytest.mark.parametrize("target", ["runs/tiny", "runs/tiny/last.safetensors"])
def test_extract_and_bench_default_under_the_run(calls, target, tmp_path):
    CliRunner().invoke(app, ["extract", target])
    assert calls["extract"].resolve() == (tmp_path / "runs" / "tiny" / "extracted").resolve()
    CliRunner().invoke(app, ["bench", target])
    assert calls["bench"].resolve() == (tmp_path / "runs" / "tiny" / "bench").resolve()
    assert calls["bench extracted"].resolve() == (tmp_path / "runs" / "tiny" / "extracted").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing in the current folder


def test_given_out_wins(calls, tmp_path):
    CliRunner().invoke(app, ["extract", "runs/tiny", "--out", "elsewhere"])
    assert str(calls["extract"]) == "elsewhere"
