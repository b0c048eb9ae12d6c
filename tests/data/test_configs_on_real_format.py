"""Every shipped config trains 2 steps and evaluates with its default output settings (prediction grids included)
on data written from the public formats: Taskonomy configs on a Taskonomy tree (omnidata and flat layouts, buildings
of the shipped tiny split), PASCAL-Context configs on a PASCAL_MT tree, synthetic configs on a rendered suite.
Only the model size, step count and batch are shrunk; tasks, heads, routers, data format and output stay."""

from pathlib import Path

import pytest

from modsquad.config import CONFIG_DIR, load_config
from modsquad.evaluate.evaluator import evaluate
from modsquad.train.trainer import train

from .real_format import make_pascal_context_tree, make_taskonomy_tree

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SHRINK = ["model.img_size=32", "model.overrides.patch_size=8", "model.overrides.embed_dim=32",
          "model.overrides.depth=2", "model.overrides.num_heads=2", "model.overrides.attn_head_dim=16",
          "model.overrides.mlp_expert_hidden=32", "model.overrides.attn_experts=4", "model.overrides.mlp_experts=4",
          "model.overrides.attn_top_k=2", "model.overrides.mlp_top_k=2", "data.batch_size=2", "data.workers=0",
          "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0", "train.device=cpu",
          "train.amp=none"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("real_format")
    for layout in ("omnidata", "flat"):
        make_taskonomy_tree(tmp / f"taskonomy_{layout}", layout, size=32)
    make_pascal_context_tree(tmp / "pascal", size=48)
    return tmp


def _data_root(path: Path, cfg, roots: Path) -> str | None:
    if cfg.data.format == "taskonomy":  # alternate the two published layouts over the configs
        return str(roots / f"taskonomy_{('omnidata', 'flat')[CONFIGS.index(path) % 2]}")
    if cfg.data.format == "pascal_context":
        return str(roots / "pascal")
    return None  # synthetic: rendered into the run's data folder on first use


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_evaluates_with_its_defaults(path, roots, tmp_path):
    base = load_config(path)
    root = _data_root(path, base, roots)
    extra = [f"data.root={root}"] if root else ["data.synth.images=8", "data.synth.size=32",
                                                f"data.root={tmp_path / 'synth'}"]
    cfg = load_config(path, [*SHRINK, *extra])
    assert cfg.output.visualize == base.output.visualize and list(cfg.model.tasks) == list(base.model.tasks)
    run = tmp_path / "run"
    result = train(cfg, run, progress=False)
    assert result.step == 2 and set(result.last_metrics) == set(cfg.model.tasks)
    assert (run / "best.safetensors").is_file()  # even when a task's first score is 0 (delta_m baseline)
    if cfg.output.visualize:
        assert 0 < len(list((run / "predictions").glob("*.png"))) <= cfg.output.visualize
    out = evaluate(run, visualize=2, device="cpu", workers=0, out=tmp_path / "eval")
    assert set(out["metrics"]) == set(cfg.model.tasks)
    assert len(list((tmp_path / "eval" / "predictions").glob("*.png"))) == 2
