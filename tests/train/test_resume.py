"""Resuming is bit-exact on CPU: N steps in one go == K steps, stop (or Ctrl-C), resume, N - K steps.

The setup exercises everything that carries state across the cut: training augmentation (random crop, flip,
colour jitter), drop path and noisy gating (torch RNG), DWA loss weighting (epoch loss history; 4 steps per
epoch, so the run crosses two epoch ends), AdamW moments, the lr schedule, an evaluation in between.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from modsquad.train.trainer import Trainer, train

N = 9


@pytest.fixture(scope="module")
def resume_cfg(make_cfg):
    def make():
        return make_cfg(model={"overrides": {**make_cfg().model.overrides, "router_kwargs": {"noisy": True}}},
                        train={"steps": N, "eval_every": 5, "weighting": "dwa", "drop_path": 0.1, "log_every": 1})

    return make


@pytest.fixture(scope="module")
def uninterrupted(resume_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    train(resume_cfg(), out, progress=False)
    return out


def _assert_same_run(a, b):
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert sa["step"] == sb["step"] == N and sa["epoch"] == sb["epoch"]
    for key in ("exp_avg", "exp_avg_sq"):
        for i, s in sa["optimizer"]["state"].items():
            assert torch.equal(s[key], sb["optimizer"]["state"][i][key]), (key, i)
    for name, t in sa["weighting"].items():
        assert torch.equal(t, sb["weighting"][name]), name
    assert sa["scheduler"]["_last_lr"] == sb["scheduler"]["_last_lr"]


def _log_steps(run):
    return [(r["kind"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_stop_and_resume_is_bit_exact(resume_cfg, uninterrupted, tmp_path):
    out = tmp_path / "cut"
    first = train(resume_cfg(), out, stop_after=3, progress=False)
    assert first.step == 3 and not first.interrupted
    second = train(None, out, resume=True, progress=False)  # the run's own config.yaml
    assert second.step == N
    _assert_same_run(uninterrupted, out)
    assert _log_steps(out) == _log_steps(uninterrupted)
    csv_steps = [[line.split(",")[:2] for line in (run / "metrics.csv").read_text().splitlines()]
                 for run in (out, uninterrupted)]
    assert csv_steps[0] == csv_steps[1]


@pytest.mark.parametrize("where", ["after_step", "mid_step"])
def test_ctrl_c_saves_and_resume_is_bit_exact(resume_cfg, uninterrupted, tmp_path, monkeypatch, where):
    """Ctrl-C right after step 6, or inside step 7 after its forward (whose usage counts must be undone)."""
    name = "_optimizer_step" if where == "after_step" else "_loss"
    real = getattr(Trainer, name)
    calls = []

    def interrupting(self, *args):
        out = real(self, *args)
        calls.append(1)
        if len(calls) == (6 if where == "after_step" else 7):
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Trainer, name, interrupting)
    out = tmp_path / "ctrl_c"
    result = train(resume_cfg(), out, progress=False)
    assert result.interrupted and result.step == 6
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(Trainer, name, real)
    train(resume_cfg(), out, resume=True, progress=False)
    _assert_same_run(uninterrupted, out)


def test_resume_with_loader_workers_is_bit_exact(make_cfg, tmp_path):
    """Worker processes see other first samples after a resume; augmentation must not depend on that."""
    def cfg():
        return make_cfg(data={"workers": 2}, train={"steps": 5, "eval_every": 100})

    train(cfg(), tmp_path / "full", progress=False)
    train(cfg(), tmp_path / "cut", stop_after=3, progress=False)
    train(cfg(), tmp_path / "cut", resume=True, progress=False)
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_with_another_model_is_refused(resume_cfg, uninterrupted, make_cfg, tmp_path):
    import shutil

    from modsquad.core.errors import CheckpointError

    out = tmp_path / "other"
    shutil.copytree(uninterrupted, out)
    other = make_cfg(model={"overrides": {**make_cfg().model.overrides, "mlp_experts": 8}})
    with pytest.raises(CheckpointError, match="mlp_experts"):
        train(other, out, resume=True, progress=False)


def test_ctrl_c_inside_a_checkpoint_write_saves_it_again(resume_cfg, uninterrupted, tmp_path, monkeypatch):
    """An interrupt that aborts the first checkpoint's commit (end of epoch 1): the interrupt's own save must
    still commit that step (not skip it as already saved), and the resumed run equals the uninterrupted one."""
    import modsquad.train.state as state_module

    real = state_module.commit_run_checkpoint
    calls = []

    def interrupting(run_dir, writers, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(run_dir, writers, **kwargs)

    monkeypatch.setattr(state_module, "commit_run_checkpoint", interrupting)
    out = tmp_path / "in_save"
    result = train(resume_cfg(), out, progress=False)
    assert result.interrupted and result.step > 0
    assert json.loads((out / "checkpoint.json").read_text())["step"] == result.step
    monkeypatch.setattr(state_module, "commit_run_checkpoint", real)
    train(resume_cfg(), out, resume=True, progress=False)
    _assert_same_run(uninterrupted, out)
    assert _log_steps(out) == _log_steps(uninterrupted)


def test_ctrl_c_during_an_evaluation_redoes_it_on_resume(resume_cfg, uninterrupted, tmp_path, monkeypatch):
    import modsquad.train.trainer as trainer_module

    real = trainer_module.evaluate_model

    def interrupting(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "evaluate_model", interrupting)
    out = tmp_path / "in_eval"
    result = train(resume_cfg(), out, progress=False)
    assert result.interrupted and result.step > 0  # the first evaluation never finished
    monkeypatch.setattr(trainer_module, "evaluate_model", real)
    train(resume_cfg(), out, resume=True, progress=False)
    _assert_same_run(uninterrupted, out)
    assert _log_steps(out) == _log_steps(uninterrupted)  # the step-5 evaluation is in the log
    a, b = load_file(uninterrupted / "best.safetensors"), load_file(out / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_between_commit_and_links_leaves_a_loadable_run(resume_cfg, tmp_path, monkeypatch):
    import modsquad.checkpoint as checkpoint_module
    from modsquad.checkpoint import load_model, read_metadata, resolve_checkpoint

    # as if killed right after checkpoint.json was replaced, before the top-level hard links
    monkeypatch.setattr(checkpoint_module, "sync_run_files", lambda run_dir: None)
    out = tmp_path / "no_links"
    train(resume_cfg(), out, stop_after=2, progress=False)
    assert not (out / "last.safetensors").exists()
    assert resolve_checkpoint(out) == out / "last.safetensors"  # readers relink the committed files
    assert int(read_metadata(out)["step"]) == 2 and load_model(out) is not None


def test_resume_under_changed_settings_says_so_and_records_them(resume_cfg, tmp_path):
    from io import StringIO

    from rich.console import Console

    from modsquad.config import load_config

    out = tmp_path / "changed"
    train(resume_cfg(), out, stop_after=3, progress=False)
    cfg = resume_cfg()
    cfg.train.steps = N + 2
    buf = StringIO()
    result = train(cfg, out, resume=True, progress=False, console=Console(file=buf, width=300))
    assert result.step == N + 2
    assert f"train.steps {N} -> {N + 2}" in buf.getvalue()
    assert load_config(out / "config.yaml").train.steps == N + 2


def test_sigterm_stops_like_ctrl_c(resume_cfg, uninterrupted, tmp_path, monkeypatch):
    """Batch schedulers (and torchrun) send SIGTERM: the run saves where it is and resumes exactly."""
    import os
    import signal

    real = Trainer._optimizer_step
    calls = []

    def terminated(self, *args):
        out = real(self, *args)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", terminated)
    out = tmp_path / "sigterm"
    result = train(resume_cfg(), out, progress=False)
    assert result.interrupted and result.step == 3
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    monkeypatch.setattr(Trainer, "_optimizer_step", real)
    train(resume_cfg(), out, resume=True, progress=False)
    _assert_same_run(uninterrupted, out)
