"""What a run carries across a restart: its counters, RNG streams and the crash-safe checkpoint unit.

`RunCheckpoints` writes last.safetensors (+ best.safetensors) + state.pt as one unit through
`checkpoint.commit_run_checkpoint` (a kill at any instant leaves the previous or the new checkpoint committed)
and reads them back for `--resume`. state.pt is a plain dict that `torch.load(weights_only=True)` reads:

    version, step, epoch, step_in_epoch, world_size, epoch_loss_sum [tasks] float64, epoch_loss_steps,
    optimizer, scheduler, weighting (state dicts), rng (one entry per rank: python, numpy, torch, cuda),
    best_score, reference, last_metrics (JSON strings), reference_label   (see best.py)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import (
    commit_run_checkpoint,
    model_writer,
    read_metadata,
    read_model_config,
    read_state_dict,
    sync_run_files,
)
from ..core.atomic import ensure_dir
from ..core.devices import DistContext
from ..core.errors import CheckpointError, OutputPathError
from ..run import BEST_FILE, LAST_FILE, STATE_FILE, Run

STATE_VERSION = 1


# --- random number generators ----------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate wants the nested tuples back (torch.load may return lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng(ctx: DistContext) -> list:
    """Every rank's `rng_state()`, in rank order (collective under DDP)."""
    if not ctx.distributed:
        return [rng_state()]
    states = [None] * ctx.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


# --- counters ------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Where training is: optimizer steps done, epoch, steps done in it, and the epoch's summed task losses
    ([tasks] float64, for epoch-level weightings such as DWA)."""

    num_tasks: int
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: torch.Tensor = field(default=None)
    epoch_loss_steps: int = 0

    def __post_init__(self):
        if self.epoch_loss_sum is None:
            self.epoch_loss_sum = torch.zeros(self.num_tasks, dtype=torch.float64)

    def count_step(self, step_losses: torch.Tensor) -> None:
        """One optimizer step done; `step_losses`: [tasks] its mean task losses."""
        self.epoch_loss_sum += step_losses
        self.epoch_loss_steps += 1
        self.step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum.zero_()
        self.epoch_loss_steps = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "epoch_loss_sum": self.epoch_loss_sum.clone(), "epoch_loss_steps": self.epoch_loss_steps}

    def load_state_dict(self, state: Mapping) -> None:
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.epoch_loss_sum, self.epoch_loss_steps = state["epoch_loss_sum"], state["epoch_loss_steps"]


# --- the checkpoint unit -------------------------------------------------------------------------------

class RunCheckpoints:
    """Saves and loads the checkpoint unit of the run folder `run`; only rank 0 writes.

    `saved_step` is the step of the last checkpoint this process wrote or loaded (-1: none), so that a second
    save at the same step (only epoch bookkeeping changed since) is skipped.
    """

    def __init__(self, run: Run, ctx: DistContext, run_name: str):
        self.run, self.ctx, self.run_name = run, ctx, run_name
        self.saved_step = -1

    def check_folder(self, resume: bool) -> None:
        """A folder to start a run in (not a file, no run yet) or, with `resume`, one holding a run."""
        out = self.run.path
        if out.exists() and not out.is_dir():
            raise OutputPathError(f"run folder {out} is an existing file; choose another --out")
        has_run = self.run.has_checkpoint
        if resume and not has_run:
            raise CheckpointError(f"{out}: nothing to resume (no state.pt); drop --resume to start a new run")
        if not resume and has_run:
            raise CheckpointError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")

    def start(self, cfg) -> None:
        """A fresh run: create the folder and write config.yaml (rank 0)."""
        if self.ctx.is_main:
            ensure_dir(self.run.path, "run folder")
            self.run.write_config(cfg)

    def save(self, model: nn.Module, state: Callable[[], dict], step: int, epoch: int, best: bool = False,
             best_score: float | None = None) -> bool:
        """Commit last.safetensors, state.pt (`state()`, called on every rank: it gathers RNG states) and, when
        `best`, best.safetensors (metadata score: `best_score`). Collective under DDP. Returns False when
        skipped: a checkpoint of this step exists already and this is not a new best."""
        if self.saved_step == step and not best:
            return False
        payload = state()
        if self.ctx.is_main:
            extra = {"step": step, "epoch": epoch, "run": self.run_name}
            files = {LAST_FILE: model_writer(model, extra)}
            if best:
                files[BEST_FILE] = model_writer(model, {**extra, "score": best_score})
            files[STATE_FILE] = lambda p: torch.save(payload, p)
            # one unit: a kill at any instant leaves the previous or this checkpoint committed, never a mix
            commit_run_checkpoint(self.run.path, files, info={"step": step, "epoch": epoch})
        self.saved_step = step  # only once committed: an interrupted save is not skipped as done
        return True

    def check_model(self, model: nn.Module) -> None:
        """CheckpointError unless `model` has the committed checkpoint's architecture (before any data is built)."""
        last = self.run.committed(LAST_FILE)
        saved, mine = read_model_config(last), dict(model.config)
        diff = sorted(k for k in set(saved) | set(mine) if k != "name" and saved.get(k) != mine.get(k))
        if diff:
            raise CheckpointError(f"{last}: model differs from the config's in {', '.join(diff)}; resume with the "
                                  f"run's own config ({self.run.config_path})")

    def load(self, model: nn.Module, device: torch.device) -> dict:
        """Load the committed weights into `model` and return state.pt's dict, after checking that both are from
        the same step and that `model` has the checkpoint's architecture. Repairs the top-level links (rank 0)."""
        # the committed checkpoint (checkpoint.json); the top-level files for a run of an older modsquad
        path, last = self.run.committed(STATE_FILE), self.run.committed(LAST_FILE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read training state ({e})") from None
        meta = read_metadata(last)
        if int(meta.get("step", -1)) != state["step"]:
            raise CheckpointError(f"{last} is from step {meta.get('step')} but {path} from step {state['step']}; "
                                  f"the run directory is inconsistent")
        self.check_model(model)
        model.load_state_dict(read_state_dict(last, device))
        self.saved_step = state["step"]
        if self.ctx.is_main:
            sync_run_files(self.run.path)  # a kill after the last commit may have left older top-level links
        return state

    def kept(self) -> str:
        """What a run that stops now leaves behind, for error messages."""
        last: Path = self.run.last_path
        if not last.is_file():
            return "no checkpoint was saved yet"
        return f"the last good checkpoint {last} (step {read_metadata(last)['step']}) is kept"


__all__ = ["STATE_VERSION", "RunCheckpoints", "TrainState", "gather_rng", "rng_state", "seed_all", "set_rng_state"]
