"""Datasets from a run config: the one place that turns `cfg.data` + `cfg.model` into datasets and loaders.

Training, evaluation, usage counting, extraction checks and benchmarks all build their data here, so a split
means the same images everywhere:

    root = prepare_data_root(cfg, render=True)          # renders a missing synthetic suite (training only)
    train_set = build_split(cfg, "train", train=True)     # with augmentation
    val_set = build_split(cfg, "val", train=False)        # resize only
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from ..core.devices import DistContext
from ..core.errors import ConfigError, DataError
from ..tasks import get_task
from .loader import build_dataset
from .synthetic import synthesize
from .transforms import JointTransform


def synthetic_root(cfg: DictConfig) -> Path:
    """Where a synthetic suite lives: data.root, or data/synthetic/<images>x<size>_seed<seed> when unset."""
    if cfg.data.root:
        return Path(cfg.data.root)
    s = cfg.data.synth
    return Path("data") / "synthetic" / f"{s.images}x{s.size}_seed{s.seed}"


def resolve_data_root(cfg: DictConfig, base: str | Path) -> DictConfig:
    """Make a relative data.root of `cfg` absolute against `base` (the run folder for a run's config.yaml, the
    working directory for a config given on the command line), in place; returns `cfg`."""
    if cfg.data.root and not Path(cfg.data.root).expanduser().is_absolute():
        cfg.data.root = os.path.normpath((Path(base) / cfg.data.root).absolute())
    elif cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser())
    return cfg


def synth_command(cfg: DictConfig, root: Path) -> str:
    """The `modsquad data synth` command that renders the synthetic suite `cfg` describes into `root`."""
    s = cfg.data.synth
    return f"modsquad data synth {root} --images {s.images} --size {s.size} --seed {s.seed}"


def prepare_data_root(cfg: DictConfig, ctx: DistContext | None = None, render: bool = False) -> Path:
    """The dataset root of `cfg`. A synthetic suite that does not exist yet is rendered when `render` (training,
    whose config asks for it), else it is a DataError that says how to make it: nothing is rendered that the
    user did not ask for.

    Rendering is deterministic (data.synth settings) and goes to a temporary folder that is renamed into
    place, so an interrupted or concurrent render never leaves half a dataset. In DDP, rank 0 renders and the
    others wait.
    """
    if cfg.data.format != "synthetic":
        if not cfg.data.root:
            raise DataError(f"data.root is not set (data.format {cfg.data.format!r} needs the dataset folder)")
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder (data.root, or --data-root)")
        return root
    root = synthetic_root(cfg)
    if root.exists() and not root.is_dir():
        raise DataError(f"data root {root} is a file, not a dataset folder")
    if not render:
        if not (root.is_dir() and any(root.iterdir())):
            raise DataError(f"data root {root} does not exist or is empty; render the synthetic suite with "
                            f"`{synth_command(cfg, root)}` (or pass the dataset's folder)")
        return root
    is_main = ctx is None or ctx.is_main
    if is_main and not (root.is_dir() and any(root.iterdir())):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            s = cfg.data.synth
            synthesize(tmp, images=s.images, size=s.size, seed=s.seed)
            if root.is_dir():  # an empty folder the user made
                root.rmdir()
            os.replace(tmp, root)
        except OSError:
            if not (root.is_dir() and any(root.iterdir())):  # lost no race: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if ctx is not None and ctx.distributed:
        torch.distributed.barrier()
    return root


def build_split(cfg: DictConfig, split: str, train: bool, max_images: int | None = None,
                root: Path | None = None, tasks: Sequence[str] | None = None) -> Dataset:
    """The dataset of one split for `tasks` (default `cfg`'s tasks; [] reads images only), train=True: with
    augmentation.

    data.resize (shorter side before the random crop) and data.hflip change the loader's default training
    augmentation; evaluation always resizes to model.img_size.
    """
    root = root if root is not None else prepare_data_root(cfg)
    kw = {}
    if train and (cfg.data.resize or not cfg.data.hflip):
        pascal = cfg.data.format == "pascal_context"
        aug = {"hflip": 0.5 if cfg.data.hflip else 0.0}
        if cfg.data.resize and not pascal:
            aug["resize_ratio"] = cfg.data.resize / cfg.model.img_size
        kinds = {t: get_task(t).kind for t in cfg.model.tasks if get_task(t).is_dense}
        kw["transform"] = JointTransform(cfg.model.img_size, True, kinds,
                                         crop="random_resized_crop" if pascal else "resize_crop", **aug)
    if cfg.data.format == "pascal_context":
        kw["normals_valid_classes"] = cfg.data.normals_valid_classes
    tasks = list(cfg.model.tasks) if tasks is None else list(tasks)
    return build_dataset(cfg.data.format, str(root), tasks, split=split, img_size=cfg.model.img_size,
                         train=train, max_images=max_images, on_error=cfg.data.on_error,
                         split_set=cfg.data.split_set, **kw)




def eval_dataset(cfg: DictConfig | None, split: str | None = None, *, tasks: Sequence[str] | None = None,
                 root: str | os.PathLike | None = None, format: str | None = None, img_size: int | None = None,
                 max_images: int | None = None) -> tuple[Dataset, dict]:
    """The evaluation-time dataset of a checkpoint (no augmentation): evaluation, usage counting, extraction
    checks and benchmarks all read their images here. Returns (dataset, {"format", "root", "split"}).

    `cfg`: the run's config (`Run.config()`), or None for a bare checkpoint, which then needs `root` (read as
    `format`, default taskonomy, at `img_size`). `root` / `format` replace the config's data.root / data.format;
    `split` defaults to the config's eval.split (val); `tasks` defaults to the config's (labels are read for
    them; [] reads images only); `max_images` defaults to eval.max_images. Nothing is rendered here: a missing
    synthetic suite is a DataError that says how to make it. An empty split is a DataError too.
    """
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    if cfg is not None:
        cfg = cfg.copy()
        if root is not None:
            cfg.data.root = str(Path(root).absolute())
        if format is not None:
            cfg.data.format = format
        split = split or cfg.eval.split
        max_images = max_images if max_images is not None else cfg.eval.max_images
        root, format = prepare_data_root(cfg), cfg.data.format
    elif root is None:
        raise ConfigError("no run config.yaml to find the data in; give the data root (--data-root)")
    else:
        root, format, split = Path(root), format or "taskonomy", split or "val"
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder")
    try:
        if cfg is not None:
            dataset = build_split(cfg, split, train=False, max_images=max_images, root=root, tasks=tasks)
        else:
            dataset = build_dataset(format, str(root), list(tasks or []), split, img_size, train=False,
                                    max_images=max_images)
    except FileNotFoundError as e:
        raise DataError(f"{format} data at {root}: {e}") from None
    if len(dataset) == 0:
        raise DataError(f"{format} data at {root}: split {split!r} has no images")
    return dataset, {"format": format, "root": str(root), "split": split}


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """A fixed-order DataLoader over an evaluation dataset."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def random_images(n: int, img_size: int | Sequence[int], in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    """[n, in_chans, H, W] standard-normal images, the same for a seed: the one stand-in for data when a check
    has no images to run on (FLOP counts, timing, extraction checks without a dataset)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return torch.randn(n, in_chans, h, w, generator=torch.Generator().manual_seed(seed))
