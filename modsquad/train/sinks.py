"""Where the training log goes: small sinks behind one interface, chosen once per run by `build_sinks`.

A record is a dict {"kind": "train" | "eval", "step", "epoch", ...}; train records hold lr, loss, loss/<task>,
aux/<name>, weight/<task>, grad_norm, images_per_s, steps_per_s; eval records hold metrics {task: {name: v}},
score, score_vs, best (and score_skips). Every sink gets every record (`write`), is told each finished optimizer
step (`advance`) and is closed at the end (`close`):

    JsonlSink        metrics.jsonl, one JSON record per line (the complete log; `modsquad compare` reads it)
    CsvSink          metrics.csv, one row per record, one column per scalar (nested keys joined by "/")
    TensorBoardSink  tb/events.out.tfevents.*, every scalar as <kind>/<key> (output.tensorboard: false = off)
    ConsoleSink      the evaluation line; a line per train record when the console is not a terminal
    ProgressSink     a live bar on a terminal: step/total, loss, it/s, img/s, elapsed, ETA

Only rank 0 logs (`build_sinks` gives other ranks none). A resumed run drops what was logged after the step it
resumes from, so the log of a resumed run equals an uninterrupted run's.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from ..core.atomic import atomic_write
from ..run import Run
from ..tasks import get_task

#: the columns every CSV row starts with
CSV_KEYS = ("kind", "step", "epoch")


class Sink:
    """One destination of the training log. Subclasses override what they need; all calls are rank 0 only."""

    def start(self, step: int, total: int) -> None:
        """Training begins (or resumes) at `step` of `total`."""

    def write(self, record: Mapping) -> None:
        """One train or eval record."""

    def advance(self, step: int) -> None:
        """An optimizer step finished; `step` steps are done."""

    def close(self) -> None:
        """Training ended (normally, by Ctrl-C or by an error): flush and release files."""


class Sinks(Sink):
    """Fans every call out to `sinks`, in order."""

    def __init__(self, sinks: Sequence[Sink] = ()):
        self.sinks = list(sinks)

    def __iter__(self):
        return iter(self.sinks)

    def start(self, step: int, total: int) -> None:
        for s in self.sinks:
            s.start(step, total)

    def write(self, record: Mapping) -> None:
        for s in self.sinks:
            s.write(record)

    def advance(self, step: int) -> None:
        for s in self.sinks:
            s.advance(step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def flat(record: Mapping, prefix: str = "", sep: str = "/") -> dict:
    """{"metrics": {"normal": {"l1": 1}}} -> {"metrics/normal/l1": 1} (`sep` "." gives config key names)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}{sep}", sep))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a torn line."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


class JsonlSink(Sink):
    """metrics.jsonl: appended line by line. `resume_step`: keep the lines up to that step (and drop a torn last
    line); None: a fresh log."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if (s := _step_of(line)) is not None and s <= resume_step]
            atomic_write(path, lambda p: p.write_text("".join(f"{line}\n" for line in keep)))

    def write(self, record: Mapping) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _csv_value(value) -> str | float | int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return "" if value is None else value


class CsvSink(Sink):
    """metrics.csv: one row per record, columns kind, step, epoch, then every flattened key in first-seen order.
    A record with a key the header lacks (the first eval) rewrites the file once with the wider header."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.columns: list[str] = list(CSV_KEYS)
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or CSV_KEYS)
                rows = [r for r in reader if _int(r.get("step")) is not None and _int(r["step"]) <= resume_step]
            self._rewrite(rows)

    def write(self, record: Mapping) -> None:
        row = {k: _csv_value(v) for k, v in flat(record).items()}
        new = [k for k in row if k not in self.columns]
        if new or not self.path.is_file():
            rows = self._rows()
            self.columns += new
            self._rewrite([*rows, row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, lambda p: Path(p).write_text(buf.getvalue()))


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


class TensorBoardSink(Sink):
    """TensorBoard event files in `folder`: every numeric scalar of a record as `<kind>/<key>` at its step.

    A resumed run tells TensorBoard to hide the events after `resume_step` (SummaryWriter's purge_step); a fresh
    run deletes event files a run killed before its first checkpoint left in the folder."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        if resume_step is None and folder.is_dir():
            for stale in folder.glob("events.out.tfevents.*"):
                stale.unlink()
        # flushed every 10 s (not torch's 120 s) so that a TensorBoard open beside the run follows it
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1,
                                    flush_secs=10)

    def write(self, record: Mapping) -> None:
        for key, value in flat(record).items():
            if key in CSV_KEYS or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


def eval_line(record: Mapping) -> str:
    """The line printed at an evaluation: each task's primary metric, then the score and what it compares with."""
    metrics = record["metrics"]
    primary = ", ".join(f"{t} {get_task(t).primary} {m.get(get_task(t).primary, math.nan):.4g}"
                        for t, m in metrics.items())
    score = record.get("score")
    vs = record.get("score_vs", "the reference")
    if score is None:
        judged = f"delta_m undefined vs {vs}"
    else:
        judged = f"delta_m {score:+.2f}% vs {vs} (mean change of the primary metrics, higher is better)"
    skips = record.get("score_skips")
    if skips:
        judged += f"; left out (reference 0): {', '.join(skips)}"
    return f"eval step {record['step']}: {primary}; {judged}{', new best' if record.get('best') else ''}"


def train_line(record: Mapping, total: int) -> str:
    """A train record as one line, for logs that are not a terminal."""
    losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
    return (f"step {record['step']}/{total} loss {record['loss']:.4f} ({losses}) lr {record['lr']:.2e} "
            f"{record['steps_per_s']:.2f} it/s {record['images_per_s']:.1f} img/s")


class ConsoleSink(Sink):
    """Evaluation lines on `console`; with `lines`, also one line per train record."""

    def __init__(self, console: Console, lines: bool = False):
        self.console, self.lines, self.total = console, lines, 0

    def start(self, step: int, total: int) -> None:
        self.total = total

    def write(self, record: Mapping) -> None:
        if record["kind"] == "eval":
            self.console.print(eval_line(record), highlight=False, soft_wrap=True)
        elif self.lines:
            self.console.print(train_line(record, self.total), highlight=False, soft_wrap=True)


class ProgressSink(Sink):
    """A live progress bar (rich): steps done / total, last logged loss, it/s, img/s, elapsed and ETA."""

    def __init__(self, console: Console):
        columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[its]:.2f} it/s"),
                   TextColumn("{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        self.progress = Progress(*columns, console=console)
        self.bar = None

    def start(self, step: int, total: int) -> None:
        self.bar = self.progress.add_task("train", total=total, completed=step, loss=math.nan, its=0.0, ips=0.0)
        self.progress.start()

    def write(self, record: Mapping) -> None:
        if record["kind"] == "train" and self.bar is not None:
            self.progress.update(self.bar, loss=record["loss"], its=record["steps_per_s"],
                                 ips=record["images_per_s"])

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.progress.update(self.bar, completed=step)

    def close(self) -> None:
        self.progress.stop()


def build_sinks(run: Run, console: Console, *, is_main: bool, progress: bool = True, tensorboard: bool = True,
                resume_step: int | None = None) -> Sinks:
    """The sinks of one process: none off rank 0; on rank 0 jsonl, csv, TensorBoard (unless `tensorboard` is
    False), the console, and the live bar when `progress` is on and the console is a terminal (else, with
    `progress`, a console line per train record)."""
    if not is_main:
        return Sinks()
    live = progress and console.is_terminal
    sinks: list[Sink] = [JsonlSink(run.log_path, resume_step), CsvSink(run.csv_path, resume_step)]
    if tensorboard:
        sinks.append(TensorBoardSink(run.tensorboard_dir, resume_step))
    sinks.append(ConsoleSink(console, lines=progress and not live))
    if live:
        sinks.append(ProgressSink(console))
    return Sinks(sinks)


__all__ = ["ConsoleSink", "CsvSink", "JsonlSink", "ProgressSink", "Sink", "Sinks", "TensorBoardSink",
           "build_sinks", "eval_line", "flat", "train_line"]
