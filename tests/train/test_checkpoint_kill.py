"""A kill at any instant of a checkpoint write leaves a resumable run: the previous or the new checkpoint.

Every file-system operation a checkpoint does (mkdir, fsync, link, rename, unlink, rmtree, ...) is counted; for
every N the N-th one and all later ones raise, as if the process died there (no cleanup can run). The run must
then resume from the CLI, and what it loads must be the old or the new checkpoint, whole.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from modsquad.checkpoint import commit_run_checkpoint, committed_run_files, read_metadata
from modsquad.cli import app
from modsquad.train.trainer import train

OPS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"), (os, "unlink"), (os, "remove"), (os, "rmdir"),
       (os, "mkdir"), (os, "chmod"), (shutil, "rmtree"), (shutil, "copyfile")]


class Killed(BaseException):
    """Not an Exception: no `except Exception` in the code under test may swallow the 'kill'."""


class Killer:
    """Counts file operations; from the `at`-th on every one raises `Killed` (None: only count). With
    `only_in_commit`, only the operations inside `commit_run_checkpoint` count (the trainer's checkpoint)."""

    def __init__(self, monkeypatch, at: int | None = None, only_in_commit: bool = False):
        self.calls, self.at, self.active = 0, at, not only_in_commit
        for module, name in OPS:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))
        if only_in_commit:
            import modsquad.train.state as state_module

            def commit(*args, **kwargs):
                self.active = True
                try:
                    return commit_run_checkpoint(*args, **kwargs)
                finally:
                    self.active = False
            monkeypatch.setattr(state_module, "commit_run_checkpoint", commit)

    def _wrap(self, fn):
        def op(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.calls += 1
            if self.at is not None and self.calls >= self.at:
                raise Killed(f"killed at file operation {self.at}")
            return fn(*args, **kwargs)
        return op


def _text_writer(text):
    return lambda p: p.write_text(text)


def _count_ops(fn, only_in_commit: bool = False) -> int:
    with pytest.MonkeyPatch.context() as mp:
        killer = Killer(mp, only_in_commit=only_in_commit)
        fn()
        return killer.calls


def test_commit_unit_survives_a_kill_at_every_operation(tmp_path):
    def commit(run, step, best=False):
        files = {"last.safetensors": _text_writer(f"last {step}"), "state.pt": _text_writer(f"state {step}")}
        if best:
            files["best.safetensors"] = _text_writer(f"best {step}")
        commit_run_checkpoint(run, files)

    template = tmp_path / "template"
    commit(template, 1, best=True)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    total = _count_ops(lambda: commit(probe, 2))
    assert total >= 8
    for at in range(1, total + 1):
        run = tmp_path / f"kill{at}"
        shutil.copytree(template, run)
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
            Killer(mp, at)
            commit(run, 2)
        files = committed_run_files(run)
        step = files["last.safetensors"].read_text().split()[1]
        assert step in ("1", "2"), at
        assert files["state.pt"].read_text() == f"state {step}", at
        assert files["best.safetensors"].read_text() == "best 1", at  # carried over from step 1
        for name in ("last.safetensors", "state.pt", "best.safetensors"):  # top level: old or new, whole
            assert (run / name).read_text().split()[1] in ("1", "2"), (at, name)
        commit(run, 3)  # the next checkpoint works and cleans up whatever the kill left
        assert (run / "last.safetensors").read_text() == "last 3" and (run / "state.pt").read_text() == "state 3"
        assert (run / "best.safetensors").read_text() == "best 1"
        assert sorted(os.listdir(run / "ckpt")) == [files_dir.name for files_dir in
                                                    [committed_run_files(run)["state.pt"].parent]]


@pytest.fixture(scope="module")
def run_at_2(make_cfg, tmp_path_factory):
    """A tiny run stopped at step 2 (of 6), to be continued by one more checkpoint."""
    out = tmp_path_factory.mktemp("kill") / "run"
    train(make_cfg(train={"eval_every": 0, "log_every": 1}), out, stop_after=2, progress=False)
    return out


def test_resume_after_a_kill_at_every_operation_of_a_training_checkpoint(run_at_2, tmp_path, make_cfg):
    """train --resume --stop-after 3 is killed at file operation N of its checkpoint; `train --resume` works."""
    probe = tmp_path / "probe"
    shutil.copytree(run_at_2, probe)
    total = _count_ops(lambda: train(None, probe, resume=True, stop_after=3, progress=False), only_in_commit=True)
    assert total >= 8
    assert int(read_metadata(probe / "last.safetensors")["step"]) == 3
    runner = CliRunner()
    # every 3rd operation and the last (the commit unit test above kills at every single one, in 1 s)
    for at in sorted({*range(1, total + 1, 3), total}):
        run = tmp_path / f"kill{at}"
        shutil.copytree(run_at_2, run)
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
            Killer(mp, at, only_in_commit=True)
            train(None, run, resume=True, stop_after=3, progress=False)
        committed = committed_run_files(run)
        state = torch.load(committed["state.pt"], weights_only=True)
        assert state["step"] in (2, 3), at
        assert int(read_metadata(committed["last.safetensors"])["step"]) == state["step"], at
        assert int(read_metadata(run / "last.safetensors")["step"]) in (2, 3), at  # top level: whole file
        result = runner.invoke(app, ["train", "--resume", "--out", str(run), "--stop-after", "4"])
        assert result.exit_code == 0, (at, result.output)
        assert int(read_metadata(run / "last.safetensors")["step"]) == 4
        assert torch.load(run / "state.pt", weights_only=True)["step"] == 4


def test_a_run_of_an_older_version_resumes_and_converts(run_at_2, tmp_path):
    """Runs written before checkpoint.json (top-level files only) still resume."""
    run = tmp_path / "old"
    shutil.copytree(run_at_2, run)
    for name in ("last.safetensors", "state.pt"):
        data = (run / name).read_bytes()
        (run / name).unlink()
        (run / name).write_bytes(data)
    (run / "checkpoint.json").unlink()
    shutil.rmtree(run / "ckpt")
    train(None, run, resume=True, stop_after=3, progress=False)
    assert committed_run_files(run) is not None
    assert int(read_metadata(run / "last.safetensors")["step"]) == 3

