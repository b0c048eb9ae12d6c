"""Every command against a catalogue of bad inputs: exit 2, one line naming the problem, no traceback, and no
file of the user's changed, created or deleted.

One tiny trained run, its extracted models and its synthetic data (module scope) serve every case; the cases
only fail early, so the whole catalogue runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from modsquad.cli import app

TASKS = ["depth_euclidean", "normal"]
MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "moe_layout": "both", "attn_experts": 4,
         "attn_top_k": 2, "attn_head_dim": 16, "mlp_experts": 4, "mlp_top_k": 2, "mlp_expert_hidden": 32}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{name: path} of everything the cases point at, all under one folder `root`."""
    from modsquad.config import config_from_dict, save_config
    from modsquad.data import synthesize
    from modsquad.extract.export import write_extracted
    from modsquad.train.trainer import train

    root = tmp_path_factory.mktemp("bad_inputs")
    synthesize(root / "data", images=24, size=32, seed=0)
    cfg = config_from_dict({
        "name": "tiny",
        "model": {"name": "modsquad_vit_tiny", "tasks": TASKS, "img_size": 32, "overrides": MODEL},
        "data": {"format": "synthetic", "root": str(root / "data"), "batch_size": 4, "workers": 0},
        "train": {"steps": 2, "log_every": 1, "eval_every": 0, "device": "cpu"},
        "output": {"visualize": 0}})
    save_config(cfg, root / "cfg.yaml")
    plain = yaml.safe_load((root / "cfg.yaml").read_text())
    plain["model"]["overrides"] = {}  # the preset's own patch size (8)
    (root / "cfg_plain.yaml").write_text(yaml.safe_dump(plain))
    train(cfg, root / "run", progress=False)
    write_extracted(root / "run", root / "ext", device="cpu", check_images=2, heldout_images=4)

    other = root / "other_tasks"  # a checkpoint whose config.yaml lists other tasks
    shutil.copytree(root / "run", other)
    data = yaml.safe_load((other / "config.yaml").read_text())
    data["model"]["tasks"] = ["depth_euclidean", "reshading"]
    (other / "config.yaml").write_text(yaml.safe_dump(data))

    rng = np.random.default_rng(0)
    (root / "file.txt").write_text("a user's file\n")
    (root / "garbage.bin").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (root / "binary.yaml").write_bytes(b"\x00\xff\xfe" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    blob = (root / "run" / "last.safetensors").read_bytes()
    (root / "trunc.safetensors").write_bytes(blob[:len(blob) // 2])
    (root / "bad.json").write_text("{not json")
    (root / "imgs").mkdir()
    image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for name in ("a.png", "a_normal.png"):
        cv2.imwrite(str(root / "imgs" / name), image)
    (root / "imgs2").mkdir()
    cv2.imwrite(str(root / "imgs2" / "a.png"), image)
    return {"root": root, "data": root / "data", "run": root / "run", "ext": root / "ext", "cfg": root / "cfg.yaml",
            "cfg_plain": root / "cfg_plain.yaml",
            "other": other, "file": root / "file.txt", "garbage": root / "garbage.bin",
            "binyaml": root / "binary.yaml", "trunc": root / "trunc.safetensors", "badjson": root / "bad.json",
            "img": root / "imgs" / "a.png", "img_normal": root / "imgs" / "a_normal.png",
            "img2": root / "imgs2" / "a.png", "missing": root / "missing", "new": root / "new",
            "normal": root / "ext" / "normal"}


CASES = {
    # data synth
    "synth/out-is-file": ["data", "synth", "{file}"],
    "synth/out-under-file": ["data", "synth", "{file}/sub"],
    "synth/images-0": ["data", "synth", "{new}", "--images", "0"],
    "synth/images-neg": ["data", "synth", "{new}", "--images", "-3"],
    "synth/size-0": ["data", "synth", "{new}", "--size", "0"],
    "synth/images-type": ["data", "synth", "{new}", "--images", "abc"],
    "synth/workers-0": ["data", "synth", "{new}", "--workers", "0"],
    "synth/into-a-run": ["data", "synth", "{run}"],
    # data check
    "check/missing": ["data", "check", "{missing}"],
    "check/file": ["data", "check", "{file}"],
    "check/max-samples-0": ["data", "check", "{data}", "--max-samples", "0"],
    "check/max-samples-neg": ["data", "check", "{data}", "--max-samples", "-3"],
    "check/format": ["data", "check", "{data}", "--format", "nope"],
    "check/task": ["data", "check", "{data}", "--tasks", "nope"],
    # train
    "train/config-missing": ["train", "--config", "{missing}", "--out", "{new}"],
    "train/config-binary": ["train", "--config", "{binyaml}", "--out", "{new}"],
    "train/config-garbage": ["train", "--config", "{garbage}", "--out", "{new}"],
    "train/config-dir": ["train", "--config", "{data}", "--out", "{new}"],
    "train/out-is-file": ["train", "--config", "{cfg}", "--out", "{file}"],
    "train/img-size-not-patch-multiple": ["train", "--config", "{cfg}", "--out", "{new}", "--set",
                                          "model.img_size=30"],
    "train/img-size-not-preset-patch-multiple": ["train", "--config", "{cfg_plain}", "--out", "{new}", "--set",
                                                 "model.img_size=36"],
    "train/weighting-kwargs": ["train", "--config", "{cfg}", "--out", "{new}", "--set",
                               "train.weighting_kwargs={{bogus: 1}}"],
    "train/lr-nan": ["train", "--config", "{cfg}", "--out", "{new}", "--set", "train.lr=.nan"],
    "train/lr-type": ["train", "--config", "{cfg}", "--out", "{new}", "--set", "train.lr=abc"],
    "train/steps-neg": ["train", "--config", "{cfg}", "--out", "{new}", "--set", "train.steps=-1"],
    "train/unknown-key": ["train", "--config", "{cfg}", "--out", "{new}", "--set", "train.lrr=1"],
    "train/unknown-model": ["train", "--config", "{cfg}", "--out", "{new}", "--set", "model.name=nope"],
    "train/stop-after-0": ["train", "--config", "{cfg}", "--out", "{new}", "--stop-after", "0"],
    "train/stop-after-type": ["train", "--config", "{cfg}", "--out", "{new}", "--stop-after", "x"],
    "train/existing-run": ["train", "--config", "{cfg}", "--out", "{run}"],
    "train/resume-nothing": ["train", "--resume", "--out", "{new}"],
    "train/from-missing": ["train", "--from", "{missing}", "--add-tasks", "reshading", "--out", "{new}"],
    "train/add-unknown-task": ["train", "--from", "{run}", "--add-tasks", "nope", "--out", "{new}"],
    "train/freeze-without-from": ["train", "--config", "{cfg}", "--out", "{new}", "--freeze", "experts"],
    # eval
    "eval/missing": ["eval", "{missing}"],
    "eval/dir-not-a-run": ["eval", "{data}"],
    "eval/file": ["eval", "{file}"],
    "eval/truncated": ["eval", "{trunc}"],
    "eval/out-is-file": ["eval", "{run}", "--out", "{file}"],
    "eval/batch-size-0": ["eval", "{run}", "--batch-size", "0"],
    "eval/max-images-neg": ["eval", "{run}", "--max-images", "-1"],
    "eval/data-root-missing": ["eval", "{run}", "--data-root", "{missing}"],
    "eval/split": ["eval", "{run}", "--split", "nope"],
    "eval/baseline-missing": ["eval", "{run}", "--baseline", "{missing}"],
    "eval/baseline-garbage": ["eval", "{run}", "--baseline", "{badjson}"],
    "eval/task-baseline-form": ["eval", "{run}", "--task-baseline", "oops"],
    "eval/tasks-differ-from-config": ["eval", "{other}"],
    # compare
    "compare/missing": ["compare", "{missing}", "--out", "{new}"],
    "compare/out-is-file": ["compare", "{run}", "--out", "{file}"],
    "compare/not-evaluated": ["compare", "{run}", "--split", "test", "--out", "{new}"],  # no test-split eval
    "compare/baseline-garbage": ["compare", "{run}", "--baseline", "{badjson}", "--out", "{new}"],
    # usage
    "usage/missing": ["usage", "{missing}"],
    "usage/truncated": ["usage", "{trunc}", "--out", "{new}"],
    "usage/out-is-file": ["usage", "{run}", "--out", "{file}"],
    "usage/max-images-0": ["usage", "{run}", "--out", "{new}", "--max-images", "0"],
    "usage/batch-size-0": ["usage", "{run}", "--out", "{new}", "--batch-size", "0"],
    "usage/data-missing": ["usage", "{run}", "--out", "{new}", "--data", "{missing}"],
    "usage/split": ["usage", "{run}", "--out", "{new}", "--split", "nope"],
    # extract
    "extract/missing": ["extract", "{missing}", "--out", "{new}"],
    "extract/out-is-file": ["extract", "{run}", "--out", "{file}"],
    "extract/check-images-0": ["extract", "{run}", "--out", "{new}", "--check-images", "0"],
    "extract/max-images-0": ["extract", "{run}", "--out", "{new}", "--max-images", "0"],
    "extract/threshold-nan": ["extract", "{run}", "--out", "{new}", "--threshold", "nan"],
    "extract/mass-0": ["extract", "{run}", "--out", "{new}", "--mass", "0"],
    "extract/task": ["extract", "{run}", "--out", "{new}", "--tasks", "nope"],
    "extract/usage-garbage": ["extract", "{run}", "--out", "{new}", "--usage", "{garbage}"],
    "extract/usage-missing": ["extract", "{run}", "--out", "{new}", "--usage", "{missing}"],
    "extract/usage-dir-without-one": ["extract", "{run}", "--out", "{new}", "--usage", "{data}"],
    "extract/threshold-type": ["extract", "{run}", "--out", "{new}", "--threshold", "high"],
    # bench
    "bench/extracted-missing": ["bench", "{run}", "--extracted", "{missing}", "--out", "{new}"],
    "bench/out-is-file": ["bench", "{run}", "--extracted", "{ext}", "--out", "{file}"],
    "bench/batch-0": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--batch", "0"],
    "bench/repeats-0": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--repeats", "0"],
    "bench/max-images-neg": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--max-images", "-1"],
    "bench/task": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--tasks", "nope"],
    "bench/truncated": ["bench", "{trunc}", "--extracted", "{ext}", "--out", "{new}"],
    "bench/extracted-is-file": ["bench", "{run}", "--extracted", "{file}", "--out", "{new}"],
    "bench/threads-0": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--threads", "0"],
    "bench/device-unknown": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--device", "bogus"],
    "bench/device-meta": ["bench", "{run}", "--extracted", "{ext}", "--out", "{new}", "--device", "meta"],
    # predict
    "predict/image-missing": ["predict", "{normal}", "{missing}", "--out", "{new}"],
    "predict/out-is-file": ["predict", "{normal}", "{img}", "--out", "{file}"],
    "predict/batch-size-0": ["predict", "{normal}", "{img}", "--out", "{new}", "--batch-size", "0"],
    "predict/garbage-image": ["predict", "{normal}", "{garbage}", "--out", "{new}"],
    "predict/model-missing": ["predict", "{missing}", "{img}", "--out", "{new}"],
    "predict/model-is-file": ["predict", "{file}", "{img}", "--out", "{new}"],
    "predict/folder-without-images": ["predict", "{normal}", "{data}", "--out", "{new}"],
    "predict/truncated-model": ["predict", "{trunc}", "{img}", "--out", "{new}"],
    "predict/task": ["predict", "{run}", "{img}", "--task", "nope", "--out", "{new}"],
    "predict/overwrites-input": ["predict", "{run}", "{img}", "{img_normal}"],
    "predict/same-stem-two-folders": ["predict", "{normal}", "{img}", "{img2}", "--out", "{new}"],
    "predict/tasks-empty": ["predict", "{run}", "{img}", "--tasks", "", "--out", "{new}"],
    "predict/device-index": ["predict", "{normal}", "{img}", "--out", "{new}", "--device", "cuda:99"],
    "eval/device-meta": ["eval", "{run}", "--device", "meta"],
    # demo
    "demo/out-is-file": ["demo", "--out", "{file}"],
    "demo/steps-0": ["demo", "--out", "{new}", "--steps", "0"],
    "demo/images-0": ["demo", "--out", "{new}", "--images", "0"],
    "demo/size-0": ["demo", "--out", "{new}", "--size", "0"],
    "demo/size-not-multiple": ["demo", "--out", "{new}", "--size", "30"],
    "demo/threads-0": ["demo", "--out", "{new}", "--threads", "0"],
    # the app itself
    "app/unknown-command": ["nosuch"],
    "app/unknown-option": ["eval", "{run}", "--bogus"],
}


def _snapshot(root) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), so a case that changes, adds or removes one shows."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def snapshot(world):
    return _snapshot(world["root"])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, world, snapshot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output that lands in the current folder (demo_out) would land here
    args = [a.format(**{k: str(v) for k, v in world.items()}) for a in CASES[case]]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (case, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.output)
    assert _snapshot(world["root"]) == snapshot, case  # nothing changed, created or deleted
    assert os.listdir(tmp_path) == [], case
    if os.environ.get("MODSQUAD_SHOW_ERRORS"):
        print(f"\n{case}: {lines[0]}")


def test_catalogue_covers_every_command():
    commands = {case.split("/")[0] for case in CASES}
    assert commands >= {"synth", "check", "train", "eval", "compare", "usage", "extract", "bench", "predict", "demo"}


def test_the_world_is_sane(world):
    """The fixture's run and extracted models are good inputs: the same commands succeed on them."""
    result = CliRunner().invoke(app, ["predict", str(world["normal"]), str(world["img"]), "--out",
                                      str(world["root"] / "pred_ok")])
    assert result.exit_code == 0, result.output
    shutil.rmtree(world["root"] / "pred_ok")
    info = json.loads((world["normal"] / "config.json").read_text())
    assert info["heldout"]["split"] == "val" and info["counted"]["split"] == "train"


def test_os_errors_of_the_place_are_one_line_others_propagate():
    import errno

    import typer

    from modsquad.cli import user_errors

    @user_errors
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/mnt/out/x.png")

    @user_errors
    def io_error():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(typer.Exit) as exit_info:
        full_disk()
    assert exit_info.value.exit_code == 2
    with pytest.raises(OSError, match="Input/output"):
        io_error()
