"""Every synthetic_tiny router config (each router, task-level modes, MI on/off, the dense baseline) trains a few
steps, shrunk to a 2-block dim-32 model with two tasks on 32 px images; every MoE variant then extracts each task
and the extracted model matches the full one."""

import pytest

from modsquad.config import CONFIG_DIR, load_config
from modsquad.extract.export import write_extracted
from modsquad.train.trainer import train

CONFIGS = sorted(CONFIG_DIR.glob("synthetic_tiny*.yaml"))
SHRINK = ["model.img_size=32", "model.overrides.embed_dim=32", "model.overrides.depth=2",
          "model.overrides.num_heads=2", "model.overrides.attn_head_dim=16", "model.overrides.mlp_expert_hidden=32",
          "model.overrides.attn_experts=4", "model.overrides.mlp_experts=4", "model.tasks=[depth_euclidean,normal]",
          "data.batch_size=4", "data.max_images=8", "eval.max_images=4", "train.steps=2", "train.warmup_steps=1",
          "train.log_every=1",
          "train.eval_every=0", "train.device=cpu", "output.visualize=0"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from modsquad.data import synthesize

    root = tmp_path_factory.mktemp("router_configs") / "synth"
    synthesize(root, images=32, size=32, seed=0)
    return root


def test_all_routers_and_modes_have_configs():
    names = {p.stem for p in CONFIGS}
    for variant in ("", "_no_mi", "_dense", "_shared", "_shared_mi", "_task_conditioned", "_task_conditioned_mi",
                    *(f"_task_level_{m}{mi}" for m in ("softmax", "gumbel", "gumbel_st") for mi in ("", "_mi"))):
        assert f"synthetic_tiny{variant}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_extracts(path, synth_root, tmp_path):
    cfg = load_config(path, [*SHRINK, f"data.root={synth_root}"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2 and set(result.last_metrics) == set(cfg.model.tasks)
    if cfg.model.name.startswith("dense_"):
        return
    extracted = write_extracted(tmp_path / "run", tmp_path / "extracted", max_images=4, check_images=2, device="cpu")
    assert set(extracted) == set(cfg.model.tasks)
    for task, summary in extracted.items():
        assert summary["max_abs_diff"] < 1e-4, task
        assert (tmp_path / "extracted" / task / "model.safetensors").is_file()
