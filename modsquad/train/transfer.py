"""Add tasks to a trained run and train only them (`modsquad train --from RUN --add-tasks X,Y`).

    result = train_add_tasks("runs/tiny", ["reshading"], out="runs/tiny+reshading", freeze="experts")
    result = train_add_tasks(None, None, out="runs/tiny+reshading", resume=True)

The new run starts from RUN's checkpoint (best, else last) grown by `models.grow.add_tasks` and frozen by
`models.grow.freeze` (through `hooks.FreezeHook`); its config is RUN's config.yaml with the new tasks appended to
model.tasks (so `modsquad eval` scores old and new tasks alike), plus `--set` overrides for data and training
(e.g. `data.max_images=16` for few-shot transfer, `train.steps=200`). Only the new tasks run in the training forward and get losses;
every evaluation scores all tasks, so the old tasks' metrics are logged beside the new ones.

The run directory is a normal run directory plus `grow.json` ({"source", "source_tasks", "new_tasks",
"freeze", "router_init_from"}), which lets `--resume` rebuild the same freezing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ..checkpoint import load_model, resolve_checkpoint
from ..config import config_from_dict, config_to_dict, load_config
from ..core.devices import cleanup_distributed
from ..core.errors import CheckpointError, ConfigError
from ..models.grow import FREEZE_MODES, add_tasks
from ..run import LAST_FILE, Run
from .hooks import FreezeHook
from .state import seed_all
from .trainer import Trainer


def add_tasks_config(source_config: str | Path, new_tasks: Sequence[str], overrides: Sequence[str] = (),
                     name: str | None = None):
    """RUN's config with `new_tasks` appended to model.tasks and `overrides` applied (model.* may not change:
    the architecture is the trained one)."""
    model_keys = [o for o in overrides if o.strip().removeprefix("--set").strip().startswith("model.")]
    if model_keys:
        raise ConfigError(f"--set {model_keys[0]}: the model comes from the source run when adding tasks; "
                          f"only data/train/aux/eval/output settings can change")
    data = config_to_dict(load_config(source_config))
    data["model"]["tasks"] = list(data["model"]["tasks"]) + list(new_tasks)
    data["train"]["init_from"] = None  # the weights come from the source run, never from a dense checkpoint
    data["output"]["dir"] = None
    data["name"] = name or f"{data['name']}+{'+'.join(new_tasks)}"
    return config_from_dict(data, str(source_config), overrides)


def train_add_tasks(source: str | Path | None, new_tasks: Sequence[str] | None, out: str | Path | None = None, *,
                    freeze: str = "none", router_init_from: str | None = None, overrides: Sequence[str] = (),
                    resume: bool = False, stop_after: int | None = None, console: Console | None = None,
                    progress: bool = True):
    """Grow the model of run (or checkpoint) `source` by `new_tasks`, freeze it (`freeze`: none | experts |
    backbone, see `models.grow`) and train the new tasks into `out` (default runs/<source name>+<tasks>).

    With `resume=True`, `source` and `new_tasks` may be None: they, the freezing and the config are read from
    `out` (grow.json, config.yaml; `overrides` still apply). Returns the trainer's `TrainResult`.
    """
    if freeze not in FREEZE_MODES:
        raise ConfigError(f"--freeze must be one of {', '.join(FREEZE_MODES)}; got {freeze!r}")
    if resume:
        if out is None:
            raise ConfigError("resuming an add-tasks run needs its directory (--out)")
        out = Path(out)
        run = Run(out)
        grow = run.grow_info()
        new_tasks, freeze = grow["new_tasks"], grow["freeze"]
        cfg = run.resume_config(overrides)
        # the checkpoint --resume continues from (see checkpoint.py); the trainer loads the same weights and the
        # optimizer, this only rebuilds the grown architecture
        model = load_model(run.committed(LAST_FILE))
    else:
        if source is None or not new_tasks:
            raise ConfigError("adding tasks needs --from RUN and --add-tasks TASK[,TASK]")
        ckpt = resolve_checkpoint(source)
        cfg_path = Run.of(ckpt).config_path
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path} not found: --from needs a run directory (or a checkpoint beside "
                                  f"its config.yaml) for the data and training settings")
        old = load_model(ckpt)
        new_tasks = list(new_tasks)
        seed_all(load_config(cfg_path, list(overrides)).train.seed)  # new heads and router rows: set by the seed
        model = add_tasks(old, new_tasks, router_init_from=router_init_from)
        cfg = add_tasks_config(cfg_path, new_tasks, overrides)
        if list(cfg.model.tasks) != model.tasks:
            raise ConfigError(f"{cfg_path}: model.tasks {list(cfg.model.tasks)[:len(old.tasks)]} differ from the "
                              f"checkpoint's tasks {old.tasks}")
        out = Path(out or Path("runs") / cfg.name)
        grow = {"source": str(ckpt), "source_tasks": list(old.tasks), "new_tasks": new_tasks, "freeze": freeze,
                "router_init_from": router_init_from}
    freezing = FreezeHook(model, freeze, new_tasks)  # before the trainer builds the optimizer
    trainer = Trainer(cfg, out, resume=resume, stop_after=stop_after, console=console, progress=progress,
                      model=model, train_tasks=list(new_tasks), hooks=[freezing])
    if not resume and trainer.ctx.is_main:
        Run(out).write_grow_info(grow)
    if trainer.ctx.is_main:
        init = f", router from {grow['router_init_from']}" if grow.get("router_init_from") else ""
        trainer.console.print(f"adding {', '.join(new_tasks)} to {grow['source']} (freeze {freeze}{init}): "
                              f"{freezing.trainable_count():,} of {sum(p.numel() for p in model.parameters()):,} "
                              f"parameters train", highlight=False)
    try:
        return trainer.fit()  # closes the hooks
    finally:
        cleanup_distributed()


__all__ = ["add_tasks_config", "train_add_tasks"]
