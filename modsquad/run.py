"""A run folder as an object: every file name of `runs/NAME/` lives here, nowhere else.

    run = Run("runs/tiny")                 # or Run.of("runs/tiny/best.safetensors")
    cfg = run.config()                     # config.yaml, data.root resolved against the run folder
    ckpt = run.checkpoint()                # best.safetensors, else last.safetensors
    run.metrics_path("val"), run.log_path, run.grow_info()

Layout (`modsquad train` writes it; see `train/trainer.py` and `checkpoint.py` for the crash-safe commit):
    config.yaml                     the resolved config the run was trained with
    checkpoint.json, ckpt/<n>/      the committed checkpoint (pointer + folder), linked to the top level as
    last.safetensors, best.safetensors, state.pt
    metrics.jsonl                   training log, one JSON record per log step and per evaluation
    metrics.csv, tb/                the same log as a table and as TensorBoard events (train/sinks.py)
    metrics.json, metrics_<s>.json  `modsquad eval` results (val, other splits)
    grow.json                       only in runs that added tasks to another run (`train --from --add-tasks`)
    usage.json, usage.png           `modsquad usage` results
    predictions/                    evaluation grids
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from .checkpoint import POINTER, committed_run_files, resolve_checkpoint
from .config import load_config, save_config
from .core.atomic import atomic_write
from .core.errors import CheckpointError, ConfigError
from .data.from_config import resolve_data_root

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.pt"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
LOG_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tb"
METRICS_FILE = "metrics.json"
GROW_FILE = "grow.json"
USAGE_FILE = "usage.json"


class Run:
    """The folder of one training run (`path`); cheap to create, reads files only when asked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of(cls, path_or_checkpoint: str | os.PathLike) -> Run:
        """The run a folder is, or the run a checkpoint file lies in (its parent folder)."""
        path = Path(path_or_checkpoint)
        return cls(path.parent if path.is_file() else path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- files ---

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        """metrics.jsonl, the training log."""
        return self.path / LOG_FILE

    @property
    def csv_path(self) -> Path:
        """metrics.csv, the training log as a table."""
        return self.path / CSV_FILE

    @property
    def tensorboard_dir(self) -> Path:
        """tb/, TensorBoard event files of the training log."""
        return self.path / TENSORBOARD_DIR

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def last_path(self) -> Path:
        return self.path / LAST_FILE

    @property
    def best_path(self) -> Path:
        return self.path / BEST_FILE

    @property
    def grow_path(self) -> Path:
        return self.path / GROW_FILE

    @property
    def usage_path(self) -> Path:
        return self.path / USAGE_FILE

    def metrics_path(self, split: str = "val") -> Path:
        """`metrics.json` for the val split, `metrics_<split>.json` for others (so a test eval keeps val's)."""
        return self.path / metrics_file(split)

    # --- state ---

    @property
    def has_config(self) -> bool:
        return self.config_path.is_file()

    @property
    def has_checkpoint(self) -> bool:
        """True once training committed a checkpoint (or an older modsquad wrote state.pt)."""
        return (self.path / POINTER).is_file() or self.state_path.is_file()

    @property
    def adds_tasks(self) -> bool:
        """True for a run that added tasks to another run (`train --from RUN --add-tasks`): it holds grow.json."""
        return self.grow_path.is_file()

    # --- config ---

    def config(self, overrides=()) -> DictConfig:
        """The run's config.yaml (with `overrides`), a relative data.root resolved against the run folder.

        CheckpointError when the run has no config.yaml (a checkpoint copied away from its run)."""
        if not self.has_config:
            raise CheckpointError(f"{self.config_path} not found: the run's data and training settings come from "
                                  f"the config.yaml that `modsquad train` saves beside its checkpoints")
        return resolve_data_root(load_config(self.config_path, list(overrides)), self.path)

    def config_or_none(self, overrides=()) -> DictConfig | None:
        """`config()`, or None when the run has no config.yaml."""
        return self.config(overrides) if self.has_config else None

    def resume_config(self, overrides=()) -> DictConfig:
        """The config a `--resume` continues with; a ConfigError (not a checkpoint error) when there is none."""
        if not self.has_config:
            raise ConfigError(f"{self.path}: nothing to resume (no {CONFIG_FILE}); start the run with --config")
        return load_config(self.config_path, list(overrides))

    def write_config(self, cfg: DictConfig) -> Path:
        """Write the resolved config as config.yaml, atomically."""
        return atomic_write(self.config_path, lambda p: save_config(cfg, p))

    # --- checkpoints ---

    def checkpoint(self) -> Path:
        """best.safetensors, else last.safetensors (CheckpointError when there is neither)."""
        return resolve_checkpoint(self.path)

    def committed_files(self) -> dict[str, Path] | None:
        """{file name: path} of the committed checkpoint (checkpoint.json), or None (see checkpoint.py)."""
        return committed_run_files(self.path)

    def committed(self, name: str) -> Path:
        """The committed copy of `name` (last.safetensors, state.pt, ...), else the top-level file."""
        files = self.committed_files()
        return files[name] if files and name in files else self.path / name

    # --- grow info ---

    def grow_info(self) -> dict:
        """grow.json: {"source", "source_tasks", "new_tasks", "freeze", "router_init_from"}."""
        try:
            return json.loads(self.grow_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no {GROW_FILE}; this run did not add tasks (resume it with plain "
                                  f"`modsquad train --resume --out {self.path}`)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.grow_path}: unreadable ({e})") from None

    def write_grow_info(self, info: dict) -> Path:
        return atomic_write(self.grow_path, lambda p: p.write_text(json.dumps(info, indent=1) + "\n"))


def metrics_file(split: str) -> str:
    """The name of the metrics file of `split` inside a run folder."""
    return METRICS_FILE if split == "val" else f"metrics_{split}.json"


__all__ = ["BEST_FILE", "CONFIG_FILE", "CSV_FILE", "GROW_FILE", "LAST_FILE", "LOG_FILE", "METRICS_FILE", "Run",
           "STATE_FILE", "TENSORBOARD_DIR", "USAGE_FILE", "metrics_file"]
