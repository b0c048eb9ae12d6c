import csv
import io
import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modsquad.checkpoint import read_metadata
from modsquad.core.devices import shard_range
from modsquad.core.errors import CheckpointError, TrainingError
from modsquad.models import create_model
from modsquad.train.distributed import EpochBatchSampler, SeededDataset, epoch_order, sample_seed
from modsquad.train.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine
from modsquad.train.trainer import train

TASKS = ["depth_euclidean", "normal", "segment_semantic"]


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# --- a short real run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(make_cfg, tmp_path_factory):
    cfg = make_cfg(train={"steps": 24, "eval_every": 12, "log_every": 4})
    out = tmp_path_factory.mktemp("runs") / "short"
    return train(cfg, out, progress=False), out


def test_loss_goes_down_for_every_task(short_run):
    result, out = short_run
    assert result.step == 24 and not result.interrupted
    logs = _records(out, "train")
    first, last = logs[0], logs[-1]
    for task in TASKS:
        assert last[f"loss/{task}"] < first[f"loss/{task}"], (task, first, last)


def test_run_directory(short_run):
    result, out = short_run
    for name in ("config.yaml", "last.safetensors", "best.safetensors", "state.pt", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert int(read_metadata(out / "last.safetensors")["step"]) == 24
    train_logs, evals = _records(out, "train"), _records(out, "eval")
    assert [r["step"] for r in train_logs] == [4, 8, 12, 16, 20, 24]
    expected = {"loss", "lr", "grad_norm", "images_per_s", "steps_per_s", "aux/mi", "aux/balance", "aux/z",
                *(f"loss/{t}" for t in TASKS), *(f"weight/{t}" for t in TASKS)}
    assert expected <= set(train_logs[0])
    assert [e["step"] for e in evals] == [12, 24]
    assert set(evals[-1]["metrics"]) == set(TASKS)
    assert evals[0]["score"] == 0.0 and evals[0]["best"]  # the first eval is the reference for best
    best = int(read_metadata(out / "best.safetensors")["step"])
    assert best == max(evals, key=lambda e: e["score"])["step"]
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 24 and set(state) >= {"optimizer", "scheduler", "weighting", "rng", "epoch"}
    assert result.last_metrics == evals[-1]["metrics"]
    assert evals[1]["score_vs"] == "this run's first evaluation (step 12)"


def test_csv_and_tensorboard_logs(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = short_run
    train_logs = _records(out, "train")
    rows = [r for r in csv.DictReader(io.StringIO((out / "metrics.csv").read_text())) if r["kind"] == "train"]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in train_logs]
    assert float(rows[-1]["loss/normal"]) == pytest.approx(train_logs[-1]["loss/normal"])
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in train_logs]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(train_logs[-1]["loss"])
    assert [e.step for e in events.Scalars("eval/score")] == [12, 24]


def test_existing_run_needs_resume(short_run, make_cfg, tmp_path):
    _, out = short_run
    with pytest.raises(CheckpointError, match="--resume"):
        train(make_cfg(), out, progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(make_cfg(), tmp_path / "empty", resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    import modsquad.tasks.losses as losses

    real, calls = losses.task_loss, {"normal": 0}

    def poisoned(spec, pred, target, mask=None, **kw):
        value = real(spec, pred, target, mask, **kw)
        if spec.name == "normal":
            calls["normal"] += 1
            if calls["normal"] == 5:  # the forward of step 5
                return value * math.nan
        return value

    monkeypatch.setattr(losses, "task_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"step 5 in loss/normal") as err:
        train(make_cfg(train={"steps": 8, "eval_every": 3}, output={"save_every": 100}), out, progress=False)
    assert "last.safetensors (step 3)" in str(err.value)
    assert int(read_metadata(out / "last.safetensors")["step"]) == 3
    assert all(torch.isfinite(t).all() for t in load_file(out / "last.safetensors").values())


def test_gradient_accumulation_matches_the_full_batch(make_cfg, tmp_path):
    """2 micro-batches of 4 == one batch of 8 (aux losses, which are batch statistics, left out)."""
    sections = dict(train={"steps": 1, "log_every": 1}, aux={"mi": 0.0, "balance": 0.0, "z": 0.0})
    train(make_cfg(data={"batch_size": 8}, **sections), tmp_path / "full", progress=False)
    train(make_cfg(data={"batch_size": 4}, train={**sections["train"], "accum_steps": 2}, aux=sections["aux"]),
          tmp_path / "accum", progress=False)
    (full,), (accum,) = _records(tmp_path / "full", "train"), _records(tmp_path / "accum", "train")
    for key in ("loss", "grad_norm", *(f"loss/{t}" for t in TASKS)):
        assert accum[key] == pytest.approx(full[key], rel=1e-5), key
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "accum" / "last.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)


def test_bf16_autocast_step(make_cfg, tmp_path):
    result = train(make_cfg(train={"steps": 1, "amp": "bf16", "log_every": 1}), tmp_path / "bf16", progress=False)
    (log,) = result.history
    assert math.isfinite(log["loss"]) and result.last_metrics is not None


def test_init_from_dense_timm_checkpoint(make_cfg, tmp_path):
    import timm

    from modsquad.train.trainer import Trainer

    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0)
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    trainer = Trainer(make_cfg(train={"init_from": str(tmp_path / "dense.pth")}), tmp_path / "run", progress=False)
    assert torch.equal(trainer.model.patch_embed.proj.weight, dense.patch_embed.proj.weight)
    assert torch.equal(trainer.model.blocks[1].norm2.weight, dense.blocks[1].norm2.weight)


# --- optimizer and schedule -----------------------------------------------------------------------------

def test_param_groups_skip_decay_for_norms_biases_and_embeddings():
    model = create_model("modsquad_vit_tiny", TASKS, img_size=32, depth=1, embed_dim=32, num_heads=2,
                         attn_head_dim=16, mlp_expert_hidden=32)
    decay, no_decay = param_groups(model, 0.05, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"pos_embed", "task_embed", "norm.weight", "blocks.0.mlp.fc1.bias"} <= undecayed
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.attn.q_weight", "patch_embed.proj.weight"} <= decayed
    assert len(decayed) + len(undecayed) == len(names)
    extra = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(model, 1e-3, 0.05, extra=[extra])
    assert opt.param_groups[-1]["params"] == [extra] and opt.param_groups[-1]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 4) == pytest.approx(0.25)
    assert warmup_cosine(3, 10, 4) == pytest.approx(1.0)
    assert warmup_cosine(4, 10, 4) == pytest.approx(1.0)
    assert warmup_cosine(7, 10, 4, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert warmup_cosine(10, 10, 4, min_ratio=0.1) == pytest.approx(0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0]) and lrs[-1] > 0.1 and lrs == sorted(lrs[:2]) + sorted(lrs[2:])[::-1]


# --- data order -----------------------------------------------------------------------------------------

def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))
    assert epoch_order(5, 0, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_sampler_shards_and_resumes_exactly():
    single = EpochBatchSampler(30, batch_size=4, seed=1)
    ranks = [EpochBatchSampler(30, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(2)
    assert len(single) == single.steps_per_epoch == 7
    for full, a, b in zip(single, *ranks, strict=True):
        assert [i for i, _ in full] == [i for i, _ in a] + [i for i, _ in b]
        assert all(seed == sample_seed(1, 2, i) for i, seed in full)
    all_batches = list(single)
    single.set_epoch(2, start_step=3)
    assert list(single) == all_batches[3:]


def test_shard_range_covers_every_sample_once():
    shards = [shard_range(10, r, 3) for r in range(3)]
    assert [i for s in shards for i in s] == list(range(10))


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return random.random(), float(np.random.rand()), torch.rand(()).item()


def test_seeded_dataset_is_reproducible_and_restores_rngs():
    ds = SeededDataset(_RandomDataset())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = ds[(1, 123)], ds[(1, 123)], ds[(1, 124)]
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), before)


def test_seeded_dataset_seeds_albumentations(synth_root):
    from modsquad.data import build_dataset

    ds = SeededDataset(build_dataset("synthetic", str(synth_root), TASKS, "train", 32, train=True))
    assert ds._augs, "the dataset's albumentations pipeline was not found"
    assert torch.equal(ds[(0, 5)]["image"], ds[(0, 5)]["image"])
    assert any(not torch.equal(ds[(0, 5)]["image"], ds[(0, s)]["image"]) for s in range(6, 12))


def test_synthetic_rendering_is_reported(make_cfg, tmp_path):
    from modsquad.core.devices import DistContext
    from modsquad.train.build import build_data

    said = []
    cfg = make_cfg(data={"root": str(tmp_path / "synth"), "synth": {"images": 6, "size": 16, "seed": 0}})
    data = build_data(cfg, DistContext(), said.append)
    assert len(data.train_set) > 0
    assert said[0].startswith("rendering the synthetic suite (6 images of 16x16, seed 0)") and "rendered" in said[1]
    said.clear()
    build_data(cfg, DistContext(), said.append)  # exists now: nothing rendered, nothing said
    assert said == []
