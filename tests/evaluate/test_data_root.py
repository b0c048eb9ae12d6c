"""Data roots of a run: stored absolute, relative ones resolved against the run folder, never rendered unasked."""

import os

import pytest
import yaml

from modsquad.core.errors import DataError
from modsquad.evaluate.evaluator import evaluate
from modsquad.extract.usage import compute_usage
from modsquad.train.trainer import train


@pytest.fixture(scope="module")
def run(make_cfg, synth_root, tmp_path_factory):
    """A 1-step run trained from the suite's parent folder with the relative data.root 'synth'."""
    out = tmp_path_factory.mktemp("root_run") / "run"
    cwd = os.getcwd()
    os.chdir(synth_root.parent)
    try:
        train(make_cfg(data={"root": "synth"}, train={"eval_every": 0}), out, stop_after=1, progress=False)
    finally:
        os.chdir(cwd)
    return out


def _set_root(run, root):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["root"] = root
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_config_stores_the_absolute_root_and_works_from_anywhere(run, synth_root, tmp_path, monkeypatch):
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(synth_root)
    monkeypatch.chdir(tmp_path)
    result = evaluate(run, max_images=2, device="cpu", out=tmp_path / "m")
    assert result["num_images"] == 2
    assert sorted(os.listdir(tmp_path)) == ["m"]  # nothing rendered into the working directory


def test_relative_root_is_relative_to_the_run_folder(run, synth_root, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.yaml", "last.safetensors"):
        (copy / name).write_bytes((run / name).read_bytes())
    _set_root(copy, os.path.relpath(synth_root, copy))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluate(copy, max_images=2, device="cpu")["num_images"] == 2
    assert compute_usage(copy, max_images=2, device="cpu")["data"]["root"] == str(synth_root)
    assert os.listdir(elsewhere) == []


def test_a_missing_root_is_an_error_that_says_how_to_make_it(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="modsquad data synth"):
        evaluate(run, data_root=missing, device="cpu", out=tmp_path / "m")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.yaml", "last.safetensors"):
        (copy / name).write_bytes((run / name).read_bytes())
    _set_root(copy, "data")  # relative to the run folder, where there is none
    with pytest.raises(DataError, match="does not exist"):
        compute_usage(copy, device="cpu")
    assert not missing.exists() and not (copy / "data").exists() and not (tmp_path / "data").exists()
