"""Shared fixtures of the run-level tests (train, evaluate, compare): one small synthetic suite per session, tiny configs.

The suite has 64 images of 32 px in 4 buildings (train 32, val 16, test 16); the model is a 2-block, dim-32
Mod-Squad ViT with MoE attention and MoE MLP in both blocks (4 experts, top-2), so a step takes milliseconds.
"""

from __future__ import annotations

import copy

import pytest

from modsquad.config import config_from_dict

TASKS = ["depth_euclidean", "normal", "segment_semantic"]

TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "moe_layout": "both", "attn_experts": 4,
              "attn_top_k": 2, "attn_head_dim": 16, "mlp_experts": 4, "mlp_top_k": 2, "mlp_expert_hidden": 32}


def tiny_config_dict(root, **sections) -> dict:
    """A config dict for the tiny model on the suite at `root`; `sections` update it one level deep."""
    cfg = {
        "name": "tiny",
        "model": {"name": "modsquad_vit_tiny", "tasks": list(TASKS), "img_size": 32,
                  "overrides": copy.deepcopy(TINY_MODEL)},
        "data": {"format": "synthetic", "root": str(root), "batch_size": 8, "workers": 0,
                 "synth": {"images": 64, "size": 32, "seed": 0}},
        "train": {"steps": 6, "lr": 2e-3, "warmup_steps": 2, "min_lr": 1e-5, "clip_grad": 1.0, "log_every": 2,
                  "eval_every": 1000, "weighting": "uncertainty", "device": "cpu", "seed": 0},
        "aux": {"mi": 0.005, "balance": 0.01, "z": 0.001},
        "output": {"visualize": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section] = {**cfg.get(section, {}), **values}
        else:
            cfg[section] = values
    return cfg


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A 64-image, 32 px synthetic Taskonomy-layout suite, rendered once per session."""
    from modsquad.data import synthesize

    root = tmp_path_factory.mktemp("run_data") / "synth"
    synthesize(root, images=64, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def make_cfg(synth_root):
    """Factory: `make_cfg(train={"steps": 4}, ...)` -> validated DictConfig of the tiny setup
    (`make_cfg(as_dict=True, ...)` gives the plain dict, e.g. to send to other processes)."""

    def make(as_dict: bool = False, **sections):
        data = tiny_config_dict(synth_root, **sections)
        return data if as_dict else config_from_dict(data)

    return make


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_run_tests(one_thread):
    """Every run-level test runs tiny models on one torch thread (tests/conftest.py)."""
