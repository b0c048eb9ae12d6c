"""Two gloo processes with batch B each == one process with batch 2B: same samples, same update.

The aux losses are left out of the total (weights 0): MI and load balance are computed over the batch a
process sees, so they are not a per-sample mean and differ between 2 x B and 2B by design. The task losses
here are all means over fully valid pixels, so DDP's gradient average equals the single-process gradient.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from modsquad.config import config_from_dict
from modsquad.train import train


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config_from_dict(cfg), out, progress=False)


def _records(run, kind):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


@pytest.mark.slow
def test_two_process_gloo_step_matches_single_process(make_cfg, tmp_path):
    sections = dict(train={"steps": 1, "weighting": "uncertainty", "log_every": 1},
                    aux={"mi": 0.0, "balance": 0.0, "z": 0.0})
    single_cfg = make_cfg(data={"batch_size": 8}, **sections)
    ddp_cfg = make_cfg(as_dict=True, data={"batch_size": 4}, **sections)

    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp_cfg, str(tmp_path / "ddp")), nprocs=2, join=True)
    train(single_cfg, tmp_path / "single", progress=False)

    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    # the gradient (norm) after DDP's average equals the single-process one; Adam's first step is scale-free,
    # so this is what catches a sum instead of a mean
    (ddp_log,), (single_log,) = _records(ddp_run, "train"), _records(single_run, "train")
    for key in ("loss", "grad_norm", "loss/depth_euclidean", "loss/normal", "loss/segment_semantic"):
        assert ddp_log[key] == pytest.approx(single_log[key], rel=1e-5), key

    # parameters after the step; Adam turns float rounding in near-zero gradients into up to ~2% of a step
    ddp, single = load_file(ddp_run / "last.safetensors"), load_file(single_run / "last.safetensors")
    assert ddp.keys() == single.keys()
    for name in ddp:
        if name.endswith("usage"):  # per-rank counts of the tokens each process routed
            continue
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-4, msg=name)
    state = torch.load(ddp_run / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    torch.testing.assert_close(state["weighting"]["log_vars"],
                               torch.load(single_run / "state.pt", weights_only=True)["weighting"]["log_vars"])

    # the validation metrics are summed over both ranks' shards
    single_metrics, ddp_metrics = _records(single_run, "eval")[-1]["metrics"], _records(ddp_run, "eval")[-1]["metrics"]
    for task, values in single_metrics.items():
        for metric, value in values.items():
            assert ddp_metrics[task][metric] == pytest.approx(value, rel=1e-3, abs=1e-3), (task, metric)
