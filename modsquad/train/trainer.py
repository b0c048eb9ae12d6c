"""Multi-task training: the loop. One forward for all tasks, the objective's loss, AdamW; collaborators do the rest.

    result = modsquad.train.train(load_config("synthetic_tiny"), out="runs/tiny")
    result = modsquad.train.train(None, out="runs/tiny", resume=True)   # continue from the run's checkpoint

A step: every image carries all requested tasks' labels (missing ones masked), the model runs once for all
tasks, `objective.py` turns the outputs into the loss (task losses, weighting, weighted aux terms, clamp).
Gradients are accumulated over `train.accum_steps` micro-batches, clipped, and applied by AdamW with a warm-up +
cosine schedule (per step). Who does what:

    build.py      the model (and train.init_from), DDP, the data in a resumable order
    objective.py  the loss                          hooks.py   add-tasks freezing (optimizer hooks)
    state.py      counters, RNG, the crash-safe checkpoint unit (last/best.safetensors + state.pt)
    best.py       the evaluation score (delta_m vs a named reference) and best tracking
    sinks.py      metrics.jsonl, metrics.csv, TensorBoard (tb/), console lines, the progress bar

Run directory: see `modsquad/run.py`. best.safetensors holds the weights of the best evaluation (highest delta_m
over tasks' primary metrics against eval.baseline / eval.task_baselines, else the run's first evaluation).
Resuming on the same device is bit-exact: the data order and every sample's augmentation are functions of
(seed, epoch, index) (see `distributed.py`), and state.pt holds every RNG stream.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console
from torch import nn

from ..config import config_to_dict, effective_lr
from ..core.devices import DistContext, all_reduce_sum, cleanup_distributed, init_distributed
from ..core.errors import ConfigError, DataError, TrainingError
from ..data.from_config import resolve_data_root, synthetic_root
from ..evaluate.evaluator import batch_to_device, evaluate_model, load_baseline, metric_kwargs
from ..run import Run
from .best import BestTracker, Evaluation, baseline_label
from .build import build_data, build_model, check_img_size, wrap_ddp
from .distributed import no_sync_unless
from .hooks import TrainHook
from .objective import Loss, build_objective, non_finite_terms
from .optim import build_optimizer, build_scheduler
from .sinks import build_sinks, flat
from .state import STATE_VERSION, RunCheckpoints, TrainState, gather_rng, rng_state, seed_all, set_rng_state


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
    is_main: bool = True  # rank 0 (the process that writes files and prints), or the only process


@dataclass
class StepResult:
    """What an optimizer step reports: the gradient norm before clipping and the lr it was taken with."""

    grad_norm: float
    lr: float


@dataclass
class StepStart:
    """The state a step began from (usage-count buffers, RNG streams), to undo a step Ctrl-C cut short."""

    step: int
    buffers: dict[str, torch.Tensor]
    rng: dict

    @classmethod
    def take(cls, model: nn.Module, step: int) -> StepStart:
        return cls(step, {name: b.detach().clone() for name, b in model.named_buffers()}, rng_state())


class LogWindow:
    """Sums of the logged terms since the last log record; `record` averages them over micro-batches and ranks."""

    def __init__(self, step: int):
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = self.images = 0
        self.start_step, self.t0 = step, time.perf_counter()

    def add(self, loss: Loss, images: int) -> None:
        for k, v in loss.terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        for t, w in loss.weights.items():
            self.sums[f"weight/{t}"] = self.sums.get(f"weight/{t}", 0.0) + float(w)
        self.count += 1
        self.images += images

    def record(self, ctx: DistContext, step: int, epoch: int, done: StepResult) -> dict:
        """The train record of the window ending at `step` (collective under DDP); starts a new window."""
        keys = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=ctx.device) for k in keys])
        values = all_reduce_sum(values, ctx) / (self.count * ctx.world_size)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record = {"kind": "train", "step": step, "epoch": epoch, "lr": done.lr,
                  **{k: v for k, v in zip(keys, values.tolist(), strict=True)},
                  "grad_norm": done.grad_norm, "images_per_s": self.images * ctx.world_size / elapsed,
                  "steps_per_s": (step - self.start_step) / elapsed}
        self._reset(step)
        return record


@contextlib.contextmanager
def _signal_handler(handler, *signals: signal.Signals) -> Iterator[None]:
    """`handler` for `signals` inside the block, the previous handlers after it (main thread only: Python runs
    handlers there, and other threads cannot install them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _defer_sigint(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM) during an optimizer update or a checkpoint write, so an interrupt never leaves
    weights, state or files half-updated; the KeyboardInterrupt is raised right after the block (`reraise`), or
    dropped (while the interrupt's own save runs: a second Ctrl-C must not lose it)."""
    caught = []
    with _signal_handler(lambda *_: caught.append(True), signal.SIGINT, signal.SIGTERM):
        yield
    if caught and reraise:
        raise KeyboardInterrupt


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


class Trainer:
    """Builds everything a run needs from a config and trains it (`fit`). Use `train(cfg, out)`.

    Args:
        cfg: validated config (`modsquad.config.load_config`).
        out: run directory.
        resume: continue from the run's committed checkpoint (state.pt + last.safetensors).
        stop_after: stop (saving a checkpoint) once this many steps are done, without changing the lr
            schedule; for time-limited jobs and tests. None: train to the end.
        console: where progress and messages go (rank 0 only).
        progress: show a progress bar (a log line per log step when the console is not a terminal).
        model, train_tasks: for adding tasks to a trained model (`transfer.py`): a prebuilt model to train
            instead of building one from cfg.model (its frozen parameters, requires_grad=False, stay out of
            the optimizer), and the subset of its tasks that get losses and run in the training forward
            (default: all; evaluation always scores all of the model's tasks).
        hooks: `hooks.TrainHook`s, attached to the optimizer once it is built and closed when `fit` ends.
    """

    def __init__(self, cfg: DictConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
                 console: Console | None = None, progress: bool = True, *, model: nn.Module | None = None,
                 train_tasks: list[str] | None = None, hooks: Sequence[TrainHook] = ()):
        # a relative data.root means: relative to the run folder in a run's config.yaml (resume), to the working
        # directory in a config given now; config.yaml stores it absolute, so the run works from any folder
        cfg = resolve_data_root(copy.deepcopy(cfg), Path(out) if resume else Path.cwd())
        if cfg.data.format == "synthetic" and not cfg.data.root:
            cfg.data.root = str(synthetic_root(cfg).absolute())
        self.cfg, self.out, self.stop_after, self.resumed = cfg, Path(out), stop_after, resume
        self.run = Run(self.out)
        self.ctx: DistContext = init_distributed(cfg.train.device)
        self.device = self.ctx.device
        self.console = console or Console(stderr=True)
        self.tasks = list(train_tasks or cfg.model.tasks)
        self.amp = cfg.train.amp == "bf16"
        self.accum = cfg.train.accum_steps
        self.checkpoints = RunCheckpoints(self.run, self.ctx, cfg.name)
        self.checkpoints.check_folder(resume)

        # model first (same init on every rank): a config it cannot be built from fails before data is rendered
        seed_all(cfg.train.seed)
        self.model = build_model(cfg, self.tasks, self.device, self._print) if model is None else model.to(self.device)
        check_img_size(cfg, self.model)
        if resume:
            self.checkpoints.check_model(self.model)  # another config's model: refused before data is rendered

        self.data = build_data(cfg, self.ctx, self._print)
        self.steps_per_epoch = self.data.micro_batches_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{cfg.data.train_split} split has {len(self.data.train_set)} images, fewer than one "
                            f"step needs (batch {cfg.data.batch_size} x accum {self.accum} x {self.ctx.world_size} "
                            f"processes); lower data.batch_size or add images")
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        warmup = cfg.train.warmup_steps or round(cfg.train.warmup_epochs * self.steps_per_epoch)

        self.objective = build_objective(cfg, self.tasks, self.device)
        self.optimizer = build_optimizer(self.model, effective_lr(cfg, self.ctx.world_size), cfg.train.weight_decay,
                                         extra=self.objective.weighting.parameters(), eps=cfg.train.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, cfg.train.min_lr)
        self.state = TrainState(len(self.tasks))
        self.best = BestTracker(self.tasks, load_baseline(cfg.eval.baseline, dict(cfg.eval.task_baselines)),
                                baseline_label(cfg.eval.baseline, dict(cfg.eval.task_baselines)))
        seed_all(cfg.train.seed + self.ctx.rank)  # drop-path / noise differ per rank, like the data
        if resume:
            self._load_state()
            self._note_changed_settings(cfg)
        else:
            self.checkpoints.start(cfg)
        self.sinks = build_sinks(self.run, self.console, is_main=self.ctx.is_main, progress=progress,
                                 tensorboard=cfg.output.tensorboard, resume_step=self.state.step if resume else None)
        self.ddp_model = wrap_ddp(self.model, self.ctx)
        if cfg.train.get("compile", False):  # the training forward only; checkpoints keep self.model's names
            self.ddp_model = torch.compile(self.ddp_model)
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.attach(self.optimizer)

    def _print(self, msg: str) -> None:
        if self.ctx.is_main:
            self.console.print(msg, highlight=False, soft_wrap=True)

    # --- checkpoints ---

    def _state(self) -> dict:
        """state.pt's contents (collective under DDP: every rank's RNG states are gathered)."""
        return {"version": STATE_VERSION, **self.state.state_dict(), "world_size": self.ctx.world_size,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "weighting": self.objective.weighting.state_dict(), "rng": gather_rng(self.ctx),
                **self.best.state_dict()}

    def save(self, best: bool = False, reraise: bool = True) -> None:
        """Commit last.safetensors (and best.safetensors) and state.pt as one unit; collective under DDP. An
        interrupt waits until the checkpoint is committed (and is dropped with `reraise=False`)."""
        with _defer_sigint(reraise):
            self.checkpoints.save(self.model, self._state, self.state.step, self.state.epoch, best=best,
                                  best_score=self.best.best_score)

    def _load_state(self) -> None:
        state = self.checkpoints.load(self.model, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.weighting.load_state_dict(state["weighting"])
        self.state.load_state_dict(state)
        self.best.load_state_dict(state)
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            set_rng_state(rng[self.ctx.rank])
        else:
            self._print(f"[yellow]resuming with {self.ctx.world_size} processes instead of {len(rng)}: the global "
                        f"batch is data.batch_size x {self.ctx.world_size} now (was x {len(rng)}), so the rest of "
                        f"the run sees the samples in other steps, and RNG streams (drop path) restart[/]")
        self._print(f"resumed {self.out} at step {self.state.step} (epoch {self.state.epoch})")

    # --- one step ---

    def _loss(self, images: torch.Tensor, targets: dict, masks: dict) -> Loss:
        """One forward for all training tasks and its loss. images [B, 3, H, W]; targets/masks per task."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            preds = self.ddp_model(images, tasks=self.tasks)
        return self.objective(self.model, preds, targets, masks)

    def _stop(self, what: str) -> TrainingError:
        """The error that ends a run that cannot go on; nothing is saved, the last checkpoint stays."""
        return TrainingError(f"{what}; stopped, {self.checkpoints.kept()} (lower train.lr, set train.clip_grad, "
                             f"or check the data)")

    def _optimizer_step(self, step_losses: torch.Tensor) -> StepResult:
        """Clip, apply and schedule; then count the step. `step_losses`: [tasks] mean task losses of the step.

        Everything that a checkpoint records about the step changes inside one Ctrl-C-deferred block.
        """
        weighting = self.objective.weighting
        if self.ctx.distributed:  # DDP averages the model's gradients, not the loss weighting's
            for p in weighting.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad, self.ctx).div_(self.ctx.world_size)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_grad or math.inf))
        if not math.isfinite(norm):
            raise self._stop(f"non-finite gradient norm at step {self.state.step + 1}")
        lr = self.optimizer.param_groups[0]["lr"]
        with _defer_sigint():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.state.count_step(step_losses)
        return StepResult(norm, lr)

    def _undo_partial_step(self, start: StepStart | None) -> None:
        """After an interrupt: drop accumulated gradients and, if the step `start` began did not finish, the
        usage its forwards counted and the random numbers they drew, so that the saved state is the one at the
        end of the last finished step."""
        self.optimizer.zero_grad(set_to_none=True)
        if start is None or start.step != self.state.step:
            return
        with torch.no_grad():
            for name, value in start.buffers.items():
                self.model.get_buffer(name).copy_(value)
        set_rng_state(start.rng)

    # --- evaluation ---

    def evaluate(self) -> Evaluation | None:
        """Validation metrics now, scored and logged (None without a val set). Collective under DDP."""
        if self.data.val_set is None:
            return None
        cfg = self.cfg
        metrics = evaluate_model(self.model, self.data.val_set, batch_size=cfg.eval.batch_size or cfg.data.batch_size,
                                 workers=cfg.data.workers, device=self.device, amp=cfg.train.amp, ctx=self.ctx,
                                 metric_kwargs=metric_kwargs(cfg, self.model.tasks), visualize=cfg.output.visualize,
                                 vis_dir=self.out / "predictions")
        ev = self.best.update(metrics, self.state.step)
        self.sinks.write({"kind": "eval", "step": ev.step, "epoch": self.state.epoch, "metrics": metrics,
                          "score": ev.score if ev.has_score else None, "score_vs": ev.reference,
                          "best": ev.improved, **({"score_skips": ev.skips} if ev.skips else {})})
        return ev

    def checkpoint(self, evaluate: bool = False, save: bool = True) -> Evaluation | None:
        """Optionally evaluate; save last + state.pt when `save`, and best (with last) when the eval improved."""
        ev = self.evaluate() if evaluate else None
        improved = ev is not None and ev.improved
        if save or improved:
            self.save(best=improved)
        return ev

    # --- the loop ---

    def _end_epoch(self) -> None:
        sums = all_reduce_sum(self.state.epoch_loss_sum.to(self.device), self.ctx).cpu()
        steps = max(self.state.epoch_loss_steps * self.ctx.world_size, 1)
        self.objective.weighting.end_epoch({t: float(s) / steps for t, s in zip(self.tasks, sums, strict=True)})
        self.state.next_epoch()

    def _should_stop(self) -> bool:
        step = self.state.step
        return step >= self.total_steps or (self.stop_after is not None and step >= self.stop_after)

    def _train_epoch(self, window: LogWindow, history: list[dict]) -> int | None:
        """Steps until the end of the epoch (or a stop); a resumed epoch starts at `step_in_epoch`. Appends the
        train records it logs to `history`; returns the step of its last evaluation (None: it made none)."""
        eval_every, log_every = self.cfg.train.eval_every, self.cfg.train.log_every
        micro, step_losses, start, evaluated = 0, 0.0, None, None
        try:
            for batch in self.data.loader(self.state.epoch, self.state.step_in_epoch * self.accum):
                images, targets, masks = batch_to_device(batch, self.device)
                if micro % self.accum == 0:
                    start = StepStart.take(self.model, self.state.step)
                sync = (micro + 1) % self.accum == 0
                with no_sync_unless(self.ddp_model, sync):
                    loss = self._loss(images, targets, masks)
                    bad = non_finite_terms(loss.terms, self.ctx)
                    if bad:
                        raise self._stop(f"non-finite loss at step {self.state.step + 1} in {', '.join(bad)}")
                    (loss.total / self.accum).backward()
                window.add(loss, images.shape[0])
                step_losses = step_losses + torch.stack([loss.terms[f"loss/{t}"].detach().double().cpu()
                                                         for t in self.tasks]) / self.accum
                micro += 1
                if not sync:
                    continue
                done = self._optimizer_step(step_losses)
                step_losses = 0.0
                step = self.state.step
                if step % log_every == 0 or step == self.total_steps:
                    record = window.record(self.ctx, step, self.state.epoch, done)
                    self.sinks.write(record)
                    history.append(record)
                self.sinks.advance(step)
                if eval_every and step % eval_every == 0:
                    self.checkpoint(evaluate=True)
                    evaluated = step
                if self._should_stop() or self.state.step_in_epoch >= self.steps_per_epoch:
                    break
        except KeyboardInterrupt:
            self._undo_partial_step(start)
            raise
        return evaluated

    def fit(self) -> TrainResult:
        """Train until train.steps / train.epochs (or `stop_after`); Ctrl-C or SIGTERM saves and returns
        interrupted."""
        interrupted, history = False, []
        window = LogWindow(self.state.step)
        tb = self.run.tensorboard_dir
        self._print(f"logging to {self.run.log_path} and metrics.csv"
                    + (f"; TensorBoard: tensorboard --logdir {tb}" if self.cfg.output.tensorboard else ""))
        self.sinks.start(self.state.step, self.total_steps)
        try:
            # SIGTERM (batch schedulers, torchrun stopping its workers) stops training like Ctrl-C: save, exit
            with _signal_handler(_interrupt, signal.SIGTERM):
                evaluated = self._redo_interrupted_eval() if self.resumed else -1  # the step of the last eval
                self._fit_loop(window, history, evaluated)
        except KeyboardInterrupt:
            interrupted = True
            self._print(f"[yellow]interrupted at step {self.state.step}; saving (Ctrl-C is held until saved)[/]")
            self.save(reraise=False)
            self._print(f"[yellow]saved {self.run.last_path} and state.pt at step {self.state.step}; continue "
                        f"with --resume[/]")
        finally:
            self.sinks.close()
            for hook in self.hooks:
                hook.close()
        return TrainResult(self.out, self.state.step, self.state.epoch, self.total_steps, interrupted,
                           self.best.last_metrics, self.best.best_score, history, self.ctx.is_main)

    def _note_changed_settings(self, cfg: DictConfig) -> None:
        """A resume under other settings than the run's config.yaml (more steps, another batch size or seed) is a
        different run from here on: say which keys changed and record the settings it continues under."""
        if not self.run.has_config:
            return
        before = flat(config_to_dict(self.run.resume_config()), sep=".")
        after = flat(config_to_dict(cfg), sep=".")
        changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k) and not k.startswith("output.")]
        if not changed:
            return
        self._print(f"[yellow]resuming with changed settings: {'; '.join(changed)}; the run continues under them "
                    f"(not bit-equal to an uninterrupted run any more) and config.yaml records them[/]")
        if self.ctx.is_main:
            self.run.write_config(cfg)

    def _redo_interrupted_eval(self) -> int:
        """An evaluation that was due at the step the run resumes from but never finished (interrupted) runs now,
        so the resumed log and best checkpoint equal an uninterrupted run's. Returns the step of the last eval."""
        step, eval_every = self.state.step, self.cfg.train.eval_every
        last = -1 if self.best.last_step is None else self.best.last_step
        due = step > 0 and (step % eval_every == 0 if eval_every else self.state.step_in_epoch == 0)
        if due and last != step:
            self.checkpoint(evaluate=True, save=False)
            return step
        return last

    def _fit_loop(self, window: LogWindow, history: list[dict], evaluated: int) -> None:
        """The epochs of `fit`, then the final evaluation and save; `evaluated`: the step of the last evaluation."""
        eval_every, save_every = self.cfg.train.eval_every, self.cfg.output.save_every
        while not self._should_stop():
            in_epoch = self._train_epoch(window, history)
            evaluated = evaluated if in_epoch is None else in_epoch
            if self.state.step_in_epoch >= self.steps_per_epoch:
                self._end_epoch()
                ev = self.checkpoint(evaluate=not eval_every, save=self.state.epoch % save_every == 0)
                evaluated = evaluated if ev is None else ev.step
        finished = self.state.step >= self.total_steps
        self.checkpoint(evaluate=finished and evaluated != self.state.step)


def train(cfg: DictConfig | None, out: str | Path | None = None, resume: bool = False, *,
          stop_after: int | None = None, console: Console | None = None, progress: bool = True) -> TrainResult:
    """Train `cfg` into `out` (default output.dir, else runs/<name>); see the module docstring.

    With `resume=True` and no `cfg`, the run's own config.yaml is used. Under torchrun, every process calls
    this; only rank 0 writes files and prints (`TrainResult.is_main`).
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
