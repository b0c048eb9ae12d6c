"""The training log's sinks: what each file holds, how a resume trims it, which sinks a process gets."""

import csv
import io
import json

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from modsquad.run import Run
from modsquad.train.sinks import (
    ConsoleSink,
    CsvSink,
    JsonlSink,
    ProgressSink,
    TensorBoardSink,
    build_sinks,
    eval_line,
)

TRAIN = [{"kind": "train", "step": s, "epoch": 0, "lr": 1e-3, "loss": 1.0 / s, "loss/normal": 0.5 / s,
          "grad_norm": 2.0, "images_per_s": 10.0, "steps_per_s": 3.0} for s in (1, 2, 3)]
EVAL = {"kind": "eval", "step": 2, "epoch": 0, "metrics": {"normal": {"mean_angle": 40.0, "within_11.25": 5.0}},
        "score": 1.5, "score_vs": "baseline runs/base", "best": True, "score_skips": ["segment_semantic"]}


def _write(sink, records):
    for r in records:
        sink.write(r)
    sink.close()


def _csv_rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_jsonl_and_csv_hold_every_record_and_resume_trims_them(tmp_path):
    records = [TRAIN[0], TRAIN[1], EVAL, TRAIN[2]]
    _write(JsonlSink(tmp_path / "m.jsonl"), records)
    _write(CsvSink(tmp_path / "m.csv"), records)
    assert [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == records
    rows = _csv_rows(tmp_path / "m.csv")
    assert [r["kind"] for r in rows] == ["train", "train", "eval", "train"]
    assert float(rows[1]["loss/normal"]) == pytest.approx(0.25) and rows[1]["metrics/normal/mean_angle"] == ""
    assert float(rows[2]["metrics/normal/mean_angle"]) == 40.0 and rows[2]["best"] == "1"
    assert rows[2]["score_skips"] == "segment_semantic"

    # a resume at step 2 keeps steps <= 2 (and a torn last line), then appends
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"kind": "tr')
    JsonlSink(tmp_path / "m.jsonl", resume_step=2).write(TRAIN[2])
    CsvSink(tmp_path / "m.csv", resume_step=2).write(TRAIN[2])
    steps = [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3]
    assert [int(r["step"]) for r in _csv_rows(tmp_path / "m.csv")] == [1, 2, 2, 3]
    JsonlSink(tmp_path / "m.jsonl")  # a fresh run starts a fresh log
    assert not (tmp_path / "m.jsonl").exists()


def test_tensorboard_events_hold_the_scalars(tmp_path):
    _write(TensorBoardSink(tmp_path / "tb"), [TRAIN[0], TRAIN[1], EVAL, TRAIN[2]])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss/normal", "train/lr", "eval/score", "eval/metrics/normal/mean_angle"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [(e.step, e.value) for e in events.Scalars("eval/score")] == [(2, 1.5)]


def test_eval_line_names_the_reference():
    line = eval_line(EVAL)
    assert "normal mean_angle 40" in line and "delta_m +1.50% vs baseline runs/base" in line
    assert "higher is better" in line and "segment_semantic" in line and "new best" in line
    undefined = eval_line({**EVAL, "score": None, "best": False, "score_skips": []})
    assert "delta_m undefined vs baseline runs/base" in undefined and "best" not in undefined


def _kinds(sinks):
    return [type(s) for s in sinks]


def test_sink_selection(tmp_path):
    run = Run(tmp_path / "run")
    run.path.mkdir()
    terminal, plain = Console(file=io.StringIO(), force_terminal=True), Console(file=io.StringIO())
    assert _kinds(build_sinks(run, terminal, is_main=False)) == []  # other ranks: no files, no bar, no lines
    assert _kinds(build_sinks(run, terminal, is_main=True)) == [JsonlSink, CsvSink, TensorBoardSink, ConsoleSink,
                                                                 ProgressSink]
    sinks = build_sinks(run, plain, is_main=True, tensorboard=False)  # output.tensorboard: false; not a terminal
    assert _kinds(sinks) == [JsonlSink, CsvSink, ConsoleSink] and sinks.sinks[-1].lines
    assert not build_sinks(run, terminal, is_main=True, progress=False, tensorboard=False).sinks[-1].lines


def test_console_lines_and_progress_bar():
    out = io.StringIO()
    sink = ConsoleSink(Console(file=out, width=200), lines=True)
    sink.start(0, 3)
    _write(sink, [TRAIN[0], EVAL])
    text = out.getvalue()
    assert "step 1/3 loss 1.0000 (normal 0.5000)" in text and "3.00 it/s" in text and "vs baseline runs/base" in text

    out = io.StringIO()
    bar = ProgressSink(Console(file=out, force_terminal=True, width=200))
    bar.start(0, 3)
    bar.write(TRAIN[1])
    bar.advance(2)
    bar.close()
    text = out.getvalue()
    assert "2/3" in text and "loss 0.5000" in text and "3.00 it/s" in text and "ETA" in text
