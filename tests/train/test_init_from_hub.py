"""`train.init_from=timm:<name>` through the trainer, offline, from a Hugging Face cache laid out in tmp."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from modsquad.core.errors import CheckpointError
from modsquad.train.trainer import Trainer

NAME = "vit_small_patch16_224.augreg_in21k_ft_in1k"


def _cache_repo(cache, repo, state, commit="1" * 40):
    """huggingface_hub's cache layout of one downloaded repository: refs/main -> snapshots/<commit>/."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(state, folder / "snapshots" / commit / "model.safetensors")


def test_trainer_upcycles_from_a_timm_name_offline(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(train={"init_from": f"timm:{NAME}"})
    with pytest.raises(CheckpointError, match="hf download"):
        Trainer(cfg, tmp_path / "run0", progress=False)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0)
    _cache_repo(tmp_path / "hub", f"timm/{NAME}", {k: v.contiguous() for k, v in dense.state_dict().items()})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert torch.equal(trainer.model.patch_embed.proj.weight, dense.patch_embed.proj.weight)
    assert torch.equal(trainer.model.blocks[1].norm2.weight, dense.blocks[1].norm2.weight)
