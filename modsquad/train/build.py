"""What a run is built from: the model of the config (optionally initialised from a checkpoint), its DDP
wrapper, and the training data in a resumable order. Messages for the user go through `say`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import read_metadata, read_state_dict
from ..core.devices import DistContext, unwrap
from ..core.errors import CheckpointError, ConfigError, DataError
from ..data.from_config import build_split, prepare_data_root, synthetic_root
from ..models.registry import create_model
from ..models.upcycle import upcycle_from_timm
from .distributed import EpochBatchSampler, SeededDataset

Say = Callable[[str], None]


# --- the model -----------------------------------------------------------------------------------------

def build_model(cfg: DictConfig, tasks: list[str], device: torch.device, say: Say) -> nn.Module:
    """The model of cfg.model for `tasks` on `device`, initialised from train.init_from when set
    (ConfigError when the overrides do not fit the model)."""
    try:
        return _build_model(cfg, tasks, say).to(device)
    except (TypeError, ValueError) as e:  # option values the model cannot be built from
        raise ConfigError(f"model {cfg.model.name!r} cannot be built from model.overrides "
                          f"{dict(cfg.model.overrides)}: {e}") from None


def _build_model(cfg: DictConfig, tasks: list[str], say: Say) -> nn.Module:
    overrides = OmegaConf.to_container(cfg.model.overrides, resolve=True)
    if cfg.train.drop_path is not None:
        overrides.setdefault("drop_path_rate", cfg.train.drop_path)
    aux = {"task_prior": cfg.aux.task_prior, **dict(overrides.get("aux_losses") or {})}
    if cfg.model.name.startswith("dense_") or overrides.get("router") == "dense":
        aux = None  # a dense model has no routers; leave its aux config at the default
    if aux is not None:
        overrides["aux_losses"] = aux
    model = create_model(cfg.model.name, tasks, img_size=cfg.model.img_size, **overrides)
    init_from = cfg.train.init_from
    if init_from:
        if Path(init_from).suffix == ".safetensors" and _is_modsquad(init_from):
            init_from_modsquad(model, init_from, say)
        else:
            counts = upcycle_from_timm(model, init_from)
            say(f"initialised from dense ViT {init_from}: {counts['moe_attn']} MoE attention, "
                f"{counts['moe_mlp']} MoE MLP and {counts['dense_layers']} dense layers")
    return model


def check_img_size(cfg: DictConfig, model: nn.Module) -> None:
    patch = getattr(model, "patch_size", 1)
    if cfg.model.img_size % patch:
        raise ConfigError(f"model.img_size {cfg.model.img_size}: must be a multiple of the model's patch size "
                          f"{patch}")


def init_from_modsquad(model: nn.Module, path: str, say: Say) -> None:
    """Fine-tune from another modsquad checkpoint: copy every tensor whose name and shape match."""
    state, own = read_state_dict(path), model.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    say(f"initialised {len(shared)}/{len(own)} tensors from {path}")


def _is_modsquad(path: str | Path) -> bool:
    try:
        read_metadata(path)
    except CheckpointError:
        return False
    return True


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """`model` itself in one process, else DistributedDataParallel over it."""
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Experts that get no token on a rank have no gradient there. Usage buffers are per-rank counts, so
    # they must not be broadcast from rank 0 (torch suggests a replacement that still syncs at init).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                   find_unused_parameters=bool(unwrap(model).moe_layers()))


# --- the data ------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """The training set in a resumable order (`loader(epoch, start_step)`), and the validation set or None."""

    train_set: Dataset
    val_set: Dataset | None
    seeded: SeededDataset  # train_set, each sample under its own seed
    sampler: EpochBatchSampler
    seed: int
    workers: int
    pin_memory: bool

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def loader(self, epoch: int, start_micro_batch: int = 0) -> DataLoader:
        """The micro-batches of `epoch` from `start_micro_batch` on (a resumed epoch skips those it did)."""
        self.sampler.set_epoch(epoch, start_micro_batch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return DataLoader(self.seeded, batch_sampler=self.sampler, num_workers=self.workers,
                          pin_memory=self.pin_memory, generator=g)


def build_data(cfg: DictConfig, ctx: DistContext, say: Say) -> TrainData:
    """Training and validation sets of `cfg`; renders the synthetic suite first when it does not exist yet.
    The order of every epoch is a function of (seed, epoch), see distributed.EpochBatchSampler."""
    root = synthetic_root(cfg) if cfg.data.format == "synthetic" else None
    rendering = root is not None and ctx.is_main and not (root.is_dir() and any(root.iterdir()))
    if rendering:
        s = cfg.data.synth
        say(f"rendering the synthetic suite ({s.images} images of {s.size}x{s.size}, seed {s.seed}) into {root}; "
            f"later runs with these settings reuse it")
    t0 = time.perf_counter()
    root = prepare_data_root(cfg, ctx, render=True)
    if rendering:
        say(f"rendered {root} in {time.perf_counter() - t0:.1f} s")
    train_set = build_split(cfg, cfg.data.train_split, train=True, max_images=cfg.data.max_images, root=root)
    val_set = None
    if cfg.data.val_split:
        try:
            val_set = build_split(cfg, cfg.data.val_split, train=False, max_images=cfg.eval.max_images, root=root)
        except (DataError, FileNotFoundError) as e:
            say(f"[yellow]no validation set ({e}); training without evaluation[/]")
        if val_set is not None and len(val_set) == 0:
            val_set = None
    sampler = EpochBatchSampler(len(train_set), cfg.data.batch_size, seed=cfg.train.seed, rank=ctx.rank,
                                world_size=ctx.world_size)
    return TrainData(train_set, val_set, SeededDataset(train_set), sampler, cfg.train.seed, cfg.data.workers,
                     ctx.device.type == "cuda")


__all__ = ["TrainData", "build_data", "build_model", "check_img_size", "init_from_modsquad", "wrap_ddp"]
