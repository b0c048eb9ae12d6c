"""Multi-task training: one forward for all tasks, weighted task losses plus router aux losses, AdamW.

    result = modsquad.train.train(load_config("configs/synthetic_tiny.yaml"), out="runs/tiny")
    result = modsquad.train.train(None, out="runs/tiny", resume=True)   # continue from runs/tiny/state.pt

A step: every image carries all requested tasks' labels (missing ones masked), the model runs once for all
tasks, each task's loss comes from the task registry, the weighting (equal / uncertainty / DWA) combines them,
and the router aux losses (MI, balance, z) are added x their config weights. Gradients are accumulated over
`train.accum_steps` micro-batches, clipped, and applied by AdamW with a warm-up + cosine schedule (per step).

Run directory (`runs/NAME/`), every file written atomically:
    config.yaml        the resolved config
    last.safetensors   weights after the last saved step (metadata: step, epoch, model config)
    best.safetensors   weights at the best evaluation: highest mean delta_m over tasks' primary metrics,
                       against eval.baseline / eval.task_baselines when set, else against the run's first
                       evaluation (so one number ranks multi-task progress and no task's scale dominates);
                       tasks whose reference value is 0 are left out of the mean (`score_skips` in the log)
    state.pt           optimizer, scheduler, loss weighting, step/epoch, RNG states (python, numpy, torch,
                       per rank), best score; `torch.load(..., weights_only=True)` reads it
    metrics.jsonl      one JSON object per log step ({"kind": "train", ...}) and per eval ({"kind": "eval"}),
                       appended line by line; a resume drops the lines after the resumed step
Resuming on the same device is bit-exact: the data order and every sample's augmentation are functions of
(seed, epoch, index) (see `distributed.py`), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import (
    atomic_write,
    commit_run_checkpoint,
    model_writer,
    read_metadata,
    read_model_config,
    read_state_dict,
    sync_run_files,
)
from ..config import effective_lr
from ..core.atomic import ensure_dir
from ..core.devices import DistContext, all_reduce_sum, cleanup_distributed, init_distributed, unwrap
from ..core.errors import CheckpointError, ConfigError, DataError, OutputPathError, TrainingError, UserError
from ..data.from_config import build_split, prepare_data_root, resolve_data_root, synthetic_root
from ..evaluate.evaluator import batch_to_device, evaluate_model, load_baseline, metric_kwargs
from ..models.registry import create_model
from ..models.upcycle import upcycle_from_timm
from ..run import BEST_FILE, LAST_FILE, STATE_FILE, Run
from ..tasks import get_task
from ..tasks import losses as task_losses
from ..tasks.metrics import delta_m, zero_baseline_tasks
from ..tasks.weighting import build_weighting
from .distributed import EpochBatchSampler, SeededDataset, no_sync_unless
from .optim import build_optimizer, build_scheduler

STATE_VERSION = 1
AUX_TERMS = ("mi", "balance", "z")


@dataclass
class TrainResult:
    """What `train` did: where the run is, how far it got, its last evaluation."""

    out: Path
    step: int
    epoch: int
    total_steps: int
    interrupted: bool = False
    last_metrics: dict | None = None
    best_score: float | None = None
    history: list[dict] = field(default_factory=list)  # the train log records written by this call


# --- small helpers -------------------------------------------------------------------------------------

def _rng_state() -> dict:
    """This process's RNG states in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate wants the nested tuples back (torch.load may return lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C during an optimizer update, so an interrupt never leaves weights and state half-updated;
    the KeyboardInterrupt is raised right after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _summary_writer(out: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


# --- the trainer --------------------------------------------------------------------------------------

class Trainer:
    """Builds everything a run needs from a config and trains it (`fit`). Use `train(cfg, out)`.

    Args:
        cfg: validated config (`modsquad.config.load_config`).
        out: run directory.
        resume: continue from `out/state.pt` + `out/last.safetensors`.
        stop_after: stop (saving a checkpoint) once this many steps are done, without changing the lr
            schedule; for time-limited jobs and tests. None: train to the end.
        console: where progress and messages go (rank 0 only).
        progress: show a progress bar (a log line per log step when the console is not a terminal).
        model, train_tasks: hook for adding tasks to a trained model (`engine/transfer.py`): a prebuilt model
            to train instead of building one from cfg.model (its frozen parameters, requires_grad=False, stay
            out of the optimizer), and the subset of its tasks that get losses and run in the training forward
            (default: all; evaluation always scores all of the model's tasks).
    """

    def __init__(self, cfg: DictConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
                 console: Console | None = None, progress: bool = True, *, model: nn.Module | None = None,
                 train_tasks: list[str] | None = None):
        # a relative data.root means: relative to the run folder in a run's config.yaml (resume), to the working
        # directory in a config given now; config.yaml stores it absolute, so the run works from any folder
        cfg = resolve_data_root(copy.deepcopy(cfg), Path(out) if resume else Path.cwd())
        if cfg.data.format == "synthetic" and not cfg.data.root:
            cfg.data.root = str(synthetic_root(cfg).absolute())
        self.cfg, self.out, self.stop_after = cfg, Path(out), stop_after
        self.run = Run(self.out)
        self.ctx: DistContext = init_distributed(cfg.train.device)
        self.device = self.ctx.device
        self.console = console or Console(stderr=True)
        self.show_progress = progress and self.ctx.is_main
        self.tasks = list(train_tasks or cfg.model.tasks)
        self.amp = cfg.train.amp == "bf16"
        self.accum = cfg.train.accum_steps
        self._check_run_dir(resume)

        # model first (same init on every rank): a config it cannot be built from fails before data is rendered
        _seed_all(cfg.train.seed)
        try:
            self.model = self._build_model() if model is None else model.to(self.device)
        except (TypeError, ValueError) as e:  # option values the model cannot be built from
            raise ConfigError(f"model {cfg.model.name!r} cannot be built from model.overrides "
                              f"{dict(cfg.model.overrides)}: {e}") from None
        patch = getattr(self.model, "patch_size", 1)
        if cfg.model.img_size % patch:
            raise ConfigError(f"model.img_size {cfg.model.img_size}: must be a multiple of the model's patch size "
                              f"{patch}")

        # data: the order of every epoch is a function of (seed, epoch), see distributed.EpochBatchSampler
        root = prepare_data_root(cfg, self.ctx, render=True)
        self.train_set = build_split(cfg, cfg.data.train_split, train=True, max_images=cfg.data.max_images,
                                     root=root)
        self.val_set = None
        if cfg.data.val_split:
            try:
                self.val_set = build_split(cfg, cfg.data.val_split, train=False,
                                           max_images=cfg.eval.max_images, root=root)
            except (DataError, FileNotFoundError) as e:
                self._print(f"[yellow]no validation set ({e}); training without evaluation[/]")
            if self.val_set is not None and len(self.val_set) == 0:
                self.val_set = None
        self.seeded_train_set = SeededDataset(self.train_set)
        self.sampler = EpochBatchSampler(len(self.train_set), cfg.data.batch_size, seed=cfg.train.seed,
                                         rank=self.ctx.rank, world_size=self.ctx.world_size)
        micro_per_epoch = self.sampler.steps_per_epoch
        self.steps_per_epoch = micro_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{cfg.data.train_split} split has {len(self.train_set)} images, fewer than one step "
                            f"needs (batch {cfg.data.batch_size} x accum {self.accum} x {self.ctx.world_size} "
                            f"processes); lower data.batch_size or add images")
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        warmup = cfg.train.warmup_steps or round(cfg.train.warmup_epochs * self.steps_per_epoch)

        # loss weighting, optimizer, schedule
        weighting_kwargs = OmegaConf.to_container(cfg.train.weighting_kwargs, resolve=True)
        try:
            self.weighting = build_weighting(cfg.train.weighting, self.tasks, **weighting_kwargs).to(self.device)
        except TypeError as e:
            raise ConfigError(f"train.weighting_kwargs {weighting_kwargs}: not options of weighting "
                              f"{cfg.train.weighting!r} ({e})") from None
        self.lr = effective_lr(cfg, self.ctx.world_size)
        self.optimizer = build_optimizer(self.model, self.lr, cfg.train.weight_decay,
                                         extra=self.weighting.parameters(), eps=cfg.train.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, cfg.train.min_lr)
        self.aux_weights = {k: float(cfg.aux[k]) for k in AUX_TERMS}

        self.step = self.epoch = self.step_in_epoch = 0
        self.best_score: float | None = None
        self.reference: dict | None = load_baseline(cfg.eval.baseline, dict(cfg.eval.task_baselines))
        self.last_metrics: dict | None = None
        self.epoch_loss_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.epoch_loss_steps = 0
        _seed_all(cfg.train.seed + self.ctx.rank)  # drop-path / noise differ per rank, like the data
        if resume:
            self._load_state()
        elif self.ctx.is_main:
            ensure_dir(self.out, "run folder")
            self.run.write_config(cfg)
            self.run.log_path.unlink(missing_ok=True)
        self.ddp_model = self._wrap_ddp(self.model)
        if cfg.train.get("compile", False):  # the training forward only; checkpoints keep self.model's names
            self.ddp_model = torch.compile(self.ddp_model)
        self.writer = _summary_writer(self.out) if self.ctx.is_main else None
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0
        self._log_images = 0
        self._log_t0 = time.perf_counter()
        self.history: list[dict] = []
        self._saved_step = self._eval_step = self.step if resume else -1
        self._in_step, self._at_step_start = False, ({}, {})
        self._improved = False

    # --- setup ---

    def _print(self, msg: str) -> None:
        if self.ctx.is_main:
            self.console.print(msg, highlight=False)

    def _check_run_dir(self, resume: bool) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise OutputPathError(f"run folder {self.out} is an existing file; choose another --out")
        has_run = self.run.has_checkpoint
        if resume and not has_run:
            raise CheckpointError(f"{self.out}: nothing to resume (no state.pt); drop --resume to start a new run")
        if not resume and has_run:
            raise CheckpointError(f"{self.out} already holds a run; pass --resume to continue it, or choose "
                                  f"another --out")

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        overrides = OmegaConf.to_container(cfg.model.overrides, resolve=True)
        if cfg.train.drop_path is not None:
            overrides.setdefault("drop_path_rate", cfg.train.drop_path)
        aux = {"task_prior": cfg.aux.task_prior, **dict(overrides.get("aux_losses") or {})}
        if cfg.model.name.startswith("dense_") or overrides.get("router") == "dense":
            aux = None  # a dense model has no routers; leave its aux config at the default
        if aux is not None:
            overrides["aux_losses"] = aux
        model = create_model(cfg.model.name, self.tasks, img_size=cfg.model.img_size, **overrides)
        init_from = cfg.train.init_from
        if init_from:
            if Path(init_from).suffix == ".safetensors" and _is_modsquad(init_from):
                self._init_from_modsquad(model, init_from)
            else:
                counts = upcycle_from_timm(model, init_from)
                self._print(f"initialised from dense ViT {init_from}: {counts['moe_attn']} MoE attention, "
                            f"{counts['moe_mlp']} MoE MLP and {counts['dense_layers']} dense layers")
        return model.to(self.device)

    def _init_from_modsquad(self, model: nn.Module, path: str) -> None:
        """Fine-tune from another modsquad checkpoint: copy every tensor whose name and shape match."""
        state, own = read_state_dict(path), model.state_dict()
        shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        self._print(f"initialised {len(shared)}/{len(own)} tensors from {path}")

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Experts that get no token on a rank have no gradient there. Usage buffers are per-rank counts, so
        # they must not be broadcast from rank 0 (torch suggests a replacement that still syncs at init).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                       find_unused_parameters=bool(unwrap(model).moe_layers()))

    # --- checkpoints ---

    def _state(self) -> dict:
        rng = [_rng_state()]
        if self.ctx.distributed:
            rng = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(rng, _rng_state())
        return {"version": STATE_VERSION, "step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "world_size": self.ctx.world_size,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "weighting": self.weighting.state_dict(), "rng": rng, "best_score": self.best_score,
                "reference": json.dumps(self.reference), "last_metrics": json.dumps(self.last_metrics),
                "epoch_loss_sum": self.epoch_loss_sum.clone(), "epoch_loss_steps": self.epoch_loss_steps}

    def save(self, best: bool = False) -> None:
        """Write last.safetensors (and best.safetensors) and state.pt; collective under DDP."""
        if self._saved_step == self.step and not best:
            return  # only epoch bookkeeping changed since; a resume redoes it (see `fit`)
        state = self._state()
        self._saved_step = self.step
        if not self.ctx.is_main:
            return
        extra = {"step": self.step, "epoch": self.epoch, "run": self.cfg.name}
        files = {LAST_FILE: model_writer(self.model, extra)}
        if best:
            files[BEST_FILE] = model_writer(self.model, {**extra, "score": self.best_score})
        files[STATE_FILE] = lambda p: torch.save(state, p)
        # one unit: a kill at any instant leaves the previous or this checkpoint committed, never a mix
        commit_run_checkpoint(self.out, files, info={"step": self.step, "epoch": self.epoch})

    def _load_state(self) -> None:
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
        saved, mine = read_model_config(last), dict(self.model.config)
        diff = sorted(k for k in set(saved) | set(mine) if k != "name" and saved.get(k) != mine.get(k))
        if diff:
            raise CheckpointError(f"{last}: model differs from the config's in {', '.join(diff)}; resume with the "
                                  f"run's own config ({self.run.config_path})")
        self.model.load_state_dict(read_state_dict(last, self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.best_score = state["best_score"]
        self.reference = self.reference or json.loads(state["reference"])
        self.last_metrics = json.loads(state["last_metrics"])
        self.epoch_loss_sum, self.epoch_loss_steps = state["epoch_loss_sum"], state["epoch_loss_steps"]
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            _set_rng_state(rng[self.ctx.rank])
        else:
            self._print(f"[yellow]resuming with {self.ctx.world_size} processes instead of {len(rng)}: same data "
                        f"order, but RNG streams (drop path) restart[/]")
        if self.ctx.is_main:
            sync_run_files(self.out)  # a kill after the last commit may have left older top-level links
            self._truncate_log()
        self._print(f"resumed {self.out} at step {self.step} (epoch {self.epoch})")

    def _truncate_log(self) -> None:
        """Drop metrics.jsonl lines written after the checkpoint we resume from (and a torn last line)."""
        path = self.run.log_path
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= self.step:
                keep.append(line)
        atomic_write(path, lambda p: p.write_text("".join(f"{line}\n" for line in keep)))

    # --- logging ---

    def _log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (and TensorBoard); main process only."""
        if not self.ctx.is_main:
            return
        with open(self.run.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in _flat(record).items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _accumulate_log(self, terms: dict[str, torch.Tensor], weights: dict[str, float], images: int) -> None:
        for k, v in terms.items():
            self._log_sums[k] = self._log_sums.get(k, 0.0) + v.detach().float()
        for t, w in weights.items():
            self._log_sums[f"weight/{t}"] = self._log_sums.get(f"weight/{t}", 0.0) + float(w)
        self._log_count += 1
        self._log_images += images

    def _flush_log(self, grad_norm: float | None) -> dict:
        keys = sorted(self._log_sums)
        values = torch.stack([torch.as_tensor(self._log_sums[k], dtype=torch.float32, device=self.device)
                              for k in keys])
        values = all_reduce_sum(values, self.ctx) / (self._log_count * self.ctx.world_size)
        elapsed = time.perf_counter() - self._log_t0
        record = {"kind": "train", "step": self.step, "epoch": self.epoch,
                  "lr": self._step_lr,
                  **{k: v for k, v in zip(keys, values.tolist(), strict=True)},
                  "grad_norm": grad_norm, "images_per_s": self._log_images * self.ctx.world_size / max(elapsed, 1e-9)}
        self._log_sums, self._log_count, self._log_images, self._log_t0 = {}, 0, 0, time.perf_counter()
        self._log(record)
        self.history.append(record)
        return record

    # --- one step ---

    def _loss_terms(self, images: torch.Tensor, targets: dict, masks: dict
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """One forward for all tasks -> (total loss, {term: unweighted value}, {task: weight})."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            preds = self.ddp_model(images, tasks=self.tasks)
        losses = {t: task_losses.task_loss(get_task(t), preds[t], targets[t], masks.get(t),
                               loss=self.cfg.train.task_losses.get(t)) for t in self.tasks}
        total, weights = self.weighting(losses)
        terms = {f"loss/{t}": v for t, v in losses.items()}
        for name, value in self.model.aux_losses().items():
            terms[f"aux/{name}"] = value
            if self.aux_weights.get(name, 0.0):
                total = total + self.aux_weights[name] * value
        terms["loss"] = total
        if self.cfg.train.loss_clamp is not None:  # the official recipe's guard: no gradient past +-clamp
            total = total.clamp(-self.cfg.train.loss_clamp, self.cfg.train.loss_clamp)
        return total, terms, weights

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Stop with TrainingError on a NaN/inf loss on any rank, naming the step and the term."""
        bad = torch.stack([~torch.isfinite(v.detach().float()) for v in terms.values()]).float()
        bad = all_reduce_sum(bad, self.ctx)
        if bad.any():
            names = [k for k, b in zip(terms, bad.tolist(), strict=True) if b and k != "loss"] or ["loss"]
            raise self._stop(f"non-finite loss at step {self.step + 1} in {', '.join(names)}")

    def _stop(self, what: str) -> TrainingError:
        """The error that ends a run that cannot go on; nothing is saved, the last checkpoint stays."""
        last = self.run.last_path
        kept = (f"the last good checkpoint {last} (step {read_metadata(last)['step']}) is kept" if last.is_file()
                else "no checkpoint was saved yet")
        return TrainingError(f"{what}; stopped, {kept} (lower train.lr, set train.clip_grad, or check the data)")

    def _optimizer_step(self, step_losses: torch.Tensor) -> float:
        """Clip, apply and schedule; then count the step. `step_losses`: [tasks] mean task losses of the step.

        Everything that a checkpoint records about the step changes inside one Ctrl-C-deferred block.
        """
        if self.ctx.distributed:  # DDP averages the model's gradients, not the loss weighting's
            for p in self.weighting.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad, self.ctx).div_(self.ctx.world_size)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.train.clip_grad or math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            raise self._stop(f"non-finite gradient norm at step {self.step + 1}")
        self._step_lr = self.optimizer.param_groups[0]["lr"]
        with _defer_sigint():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.epoch_loss_sum += step_losses
            self.epoch_loss_steps += 1
            self.step += 1
            self.step_in_epoch += 1
            self._in_step = False
        return norm

    def _model_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the model's buffers (expert usage counts), to undo the forwards of an unfinished step."""
        return {name: b.detach().clone() for name, b in self.model.named_buffers()}

    def _undo_partial_step(self) -> None:
        """After an interrupt mid-step: drop its gradients, the usage its forwards counted and the random
        numbers they drew, so that the saved state is the one at the end of the last finished step."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self._in_step:
            return
        self._in_step = False
        buffers, rng = self._at_step_start
        with torch.no_grad():
            for name, value in buffers.items():
                self.model.get_buffer(name).copy_(value)
        _set_rng_state(rng)

    # --- evaluation ---

    def evaluate(self) -> dict | None:
        """Validation metrics now (None without a val set); tracks the best score. Collective under DDP."""
        if self.val_set is None:
            return None
        cfg = self.cfg
        metrics = evaluate_model(self.model, self.val_set, batch_size=cfg.eval.batch_size or cfg.data.batch_size,
                                 workers=cfg.data.workers, device=self.device, amp=cfg.train.amp, ctx=self.ctx,
                                 metric_kwargs=metric_kwargs(cfg, self.model.tasks), visualize=cfg.output.visualize,
                                 vis_dir=self.out / "predictions")
        self.reference = self.reference or metrics
        # Tasks whose reference value is 0 (an untrained model's first mIoU / F) have no relative change: they are
        # left out of the score's mean (logged as score_skips); until some task has a score, each evaluation
        # counts as the best, so best.safetensors always exists after the first evaluation.
        try:
            score = delta_m(metrics, self.reference, self.tasks, skip_zero_baselines=True)["mean"]
            skips = zero_baseline_tasks(self.reference, self.tasks)
        except UserError:  # a task missing from the reference
            score, skips = math.nan, list(self.tasks)
        self._improved = self.best_score is None if not math.isfinite(score) else \
            self.best_score is None or score > self.best_score
        if self._improved and math.isfinite(score):
            self.best_score = score
        self.last_metrics, self._eval_step = metrics, self.step
        self._log({"kind": "eval", "step": self.step, "epoch": self.epoch, "metrics": metrics,
                   "score": score if math.isfinite(score) else None, "best": self._improved,
                   **({"score_skips": skips} if skips else {})})
        primary = ", ".join(f"{t} {m.get(_primary(t)):.4g}" for t, m in metrics.items())
        self._print(f"step {self.step}: {primary}; score {score:+.2f}{' (best)' if self._improved else ''}")
        return metrics

    def checkpoint(self, evaluate: bool = False, save: bool = True) -> None:
        """Optionally evaluate; save last + state.pt when `save`, and best (with last) when the eval improved."""
        self._improved = False
        if evaluate:
            self.evaluate()
        if save or self._improved:
            self.save(best=self._improved)

    # --- the loop ---

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * self.accum)
        g = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + self.epoch)
        return DataLoader(self.seeded_train_set, batch_sampler=self.sampler,
                          num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda", generator=g)

    def _end_epoch(self) -> None:
        sums = all_reduce_sum(self.epoch_loss_sum.to(self.device), self.ctx).cpu()
        steps = max(self.epoch_loss_steps * self.ctx.world_size, 1)
        self.weighting.end_epoch({t: float(s) / steps for t, s in zip(self.tasks, sums, strict=True)})
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum.zero_()
        self.epoch_loss_steps = 0

    def _should_stop(self) -> bool:
        return self.step >= self.total_steps or (self.stop_after is not None and self.step >= self.stop_after)

    def _train_epoch(self, progress: Progress, bar) -> None:
        """Steps until the end of the epoch (or a stop); a resumed epoch starts at `step_in_epoch`."""
        eval_every, log_every = self.cfg.train.eval_every, self.cfg.train.log_every
        micro, step_losses = 0, 0.0
        for batch in self._loader():
            images, targets, masks = batch_to_device(batch, self.device)
            if micro % self.accum == 0:
                self._at_step_start, self._in_step = (self._model_buffers(), _rng_state()), True
            sync = (micro + 1) % self.accum == 0
            with no_sync_unless(self.ddp_model, sync):
                total, terms, weights = self._loss_terms(images, targets, masks)
                self._check_finite(terms)
                (total / self.accum).backward()
            self._accumulate_log(terms, weights, images.shape[0])
            step_losses = step_losses + torch.stack([terms[f"loss/{t}"].detach().double().cpu()
                                                     for t in self.tasks]) / self.accum
            micro += 1
            if not sync:
                continue
            grad_norm = self._optimizer_step(step_losses)
            step_losses = 0.0
            if self.step % log_every == 0 or self.step == self.total_steps:
                record = self._flush_log(grad_norm)
                progress.update(bar, loss=record["loss"], ips=record["images_per_s"])
                if self.show_progress and not self.console.is_terminal:
                    self._print(_log_line(record, self.total_steps))
            progress.update(bar, completed=self.step)
            if eval_every and self.step % eval_every == 0:
                self.checkpoint(evaluate=True)
            if self._should_stop() or self.step_in_epoch >= self.steps_per_epoch:
                return

    def fit(self) -> TrainResult:
        """Train until train.steps / train.epochs (or `stop_after`); Ctrl-C saves and returns interrupted."""
        eval_every = self.cfg.train.eval_every
        interrupted = False
        try:
            with self._progress() as progress:
                bar = progress.add_task("train", total=self.total_steps, completed=self.step, loss=math.nan, ips=0.0)
                while not self._should_stop():
                    self._train_epoch(progress, bar)
                    if self.step_in_epoch >= self.steps_per_epoch:
                        self._end_epoch()
                        self.checkpoint(evaluate=not eval_every, save=self.epoch % self.cfg.output.save_every == 0)
                finished = self.step >= self.total_steps
                self.checkpoint(evaluate=finished and self._eval_step != self.step)
        except KeyboardInterrupt:
            interrupted = True
            self._undo_partial_step()
            self.save()
            self._print(f"[yellow]interrupted at step {self.step}; saved {self.run.last_path} and "
                        f"state.pt; continue with --resume[/]")
        finally:
            if self.writer is not None:
                self.writer.close()
        return TrainResult(self.out, self.step, self.epoch, self.total_steps, interrupted, self.last_metrics,
                           self.best_score, self.history)

    def _progress(self) -> Progress:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        return Progress(*columns, console=self.console,
                        disable=not (self.show_progress and self.console.is_terminal))


def _primary(task: str) -> str:
    return get_task(task).primary


def _flat(record: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _log_line(record: Mapping, total: int) -> str:
    losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
    return (f"step {record['step']}/{total} loss {record['loss']:.4f} ({losses}) lr {record['lr']:.2e} "
            f"{record['images_per_s']:.1f} img/s")


def _is_modsquad(path: str | Path) -> bool:
    try:
        read_metadata(path)
    except CheckpointError:
        return False
    return True


def train(cfg: DictConfig | None, out: str | Path | None = None, resume: bool = False, *,
          stop_after: int | None = None, console: Console | None = None, progress: bool = True) -> TrainResult:
    """Train `cfg` into `out` (default output.dir, else runs/<name>); see the module docstring.

    With `resume=True` and no `cfg`, the run's own config.yaml is used. Under torchrun, every process calls
    this; only rank 0 writes files and prints.
    """
    if cfg is None:
        if out is None or not resume:
            raise ConfigError("train: give a config (only a resumed run can reuse its own config.yaml)")
        cfg = Run(out).resume_config()
    out = Path(out or cfg.output.dir or Path("runs") / (cfg.name or "run"))
    trainer = Trainer(cfg, out, resume=resume, stop_after=stop_after, console=console, progress=progress)
    try:
        return trainer.fit()
    finally:
        cleanup_distributed()
