"""Add tasks to a trained multi-task model without changing what it does for the old ones.

    grown = add_tasks(model, ["reshading"], router_init_from="normal")
    frozen = freeze(grown, "experts", ["reshading"])     # then frozen.attach(optimizer)

`add_tasks` is model surgery: the new model has the old tasks first, in their old order, then the new ones.
Every old tensor is copied bit for bit; tensors indexed by task along dim 0 (the model's task embedding, what each
MoE layer declares in `task_parameters()` - per-task router gates, a task-conditioned router's task embedding,
task-level router logits - and usage counters) get one new row per new task: each router grows itself
(`Router.grow`); every new task gets a fresh head. Nothing an old task computes changes, because each
(sample copy, task) runs through the encoder on its own: routing is per token, attention stays within a
sample copy, and old tasks read only their own rows.

`freeze` picks what trains for the new tasks, as in task-aware MoE that avoids catastrophic forgetting:
    "none"      everything trains (old tasks may drift: the forgetting baseline)
    "experts"   only the new tasks' rows of task-indexed parameters and their heads; experts, attention,
                norms, patch embedding, shared gates and old heads stay fixed: old tasks' parameters are
                bitwise unchanged and their outputs equal to float rounding (a bigger batch may take other
                BLAS kernels, so not bitwise)
    "backbone"  only the new tasks' heads (a linear probe of the frozen multi-task encoder)
Task-indexed parameters are one tensor for all tasks (`router.weight: [num_tasks, E, D]`), so their old rows
are frozen by a gradient mask; `FrozenRows.attach(optimizer)` also puts those rows back after every optimizer
step, so that AdamW's decoupled weight decay (which moves a parameter even when its gradient is zero) and any
momentum carried in the optimizer state never touch them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ConfigError
from ..tasks import get_task
from .registry import build_model_from_config
from .vit import MultiTaskViT

FREEZE_MODES = ("none", "experts", "backbone")


def task_indexed_parameters(model: MultiTaskViT) -> dict[str, nn.Parameter]:
    """{name: parameter} of the parameters with one row per task along dim 0: the model's `task_embed`
    [T, D] and what every MoE layer declares (`MoELayer.task_parameters()`, e.g. per-task router gates
    [T, E, D], task-level router logits [T, E]). These hold everything a router knows about a task."""
    params: dict[str, nn.Parameter] = {}
    if model.task_embed is not None:
        params["task_embed"] = model.task_embed
    for name, layer in model.moe_layers():
        params.update({f"{name}.{k}": p for k, p in layer.task_parameters().items()})
    return params


def _check_new_tasks(model: MultiTaskViT, new_tasks: Sequence[str]) -> list[str]:
    new_tasks = [new_tasks] if isinstance(new_tasks, str) else list(new_tasks)
    if not new_tasks:
        raise ConfigError("add_tasks: give at least one new task")
    if len(set(new_tasks)) != len(new_tasks):
        raise ConfigError(f"add_tasks: duplicate task in {new_tasks}")
    present = [t for t in new_tasks if t in model.tasks]
    if present:
        raise ConfigError(f"add_tasks: the model already has task(s) {', '.join(present)} "
                          f"(its tasks: {', '.join(model.tasks)})")
    suites = {get_task(t).suite for t in model.tasks}
    for task in new_tasks:
        suite = get_task(task).suite  # UnknownNameError for a misspelt task
        if suite not in suites:
            raise ConfigError(f"add_tasks: task {task!r} belongs to the {suite} suite, the model's tasks to "
                              f"{', '.join(sorted(suites))}")
    return new_tasks


@torch.no_grad()
def add_tasks(model: MultiTaskViT, new_tasks: Sequence[str], router_init_from: str | None = None) -> MultiTaskViT:
    """A new model with `model.tasks + new_tasks`, every old parameter and buffer copied bit-identically.

    New rows of task-indexed parameters start as a fresh model would (zero per-task gates, small random task
    logits / embeddings), or, with `router_init_from=TASK`, as copies of that old task's rows, so the new task
    starts out routed exactly like TASK (same experts, same weights) and can fine-tune from there. New usage
    counter rows start at zero; new heads are freshly initialised. The input model is not changed.
    """
    new_tasks = _check_new_tasks(model, new_tasks)
    src = model.task_index(router_init_from) if router_init_from is not None else None
    n_old = model.num_tasks
    config = copy.deepcopy(model.config)
    config["tasks"] = list(model.tasks) + new_tasks
    grown = build_model_from_config(config)
    ref = next(model.parameters())
    grown.to(device=ref.device)
    if grown.pos_embed.dtype != ref.dtype:
        grown.to(dtype=ref.dtype)

    routers = set()
    for (name, old_layer), (_, new_layer) in zip(model.moe_layers(), grown.moe_layers(), strict=True):
        new_layer.router = old_layer.router.grow(len(new_tasks), init_from=src)  # old rows copied bit for bit
        routers.add(f"{name}.router.")
    old_state, new_state = model.state_dict(), grown.state_dict()  # share storage with the modules
    indexed = set(task_indexed_parameters(grown))
    for name, old in old_state.items():
        if name.startswith(tuple(routers)):
            continue
        new = new_state[name]
        if new.shape == old.shape:
            new.copy_(old)
            continue
        if new.shape[1:] != old.shape[1:] or old.shape[0] != n_old or new.shape[0] != grown.num_tasks:
            raise RuntimeError(f"add_tasks: {name} changed from {tuple(old.shape)} to {tuple(new.shape)}, "
                               f"which is not one row per task")
        new[:n_old].copy_(old)
        if name in indexed and src is not None:
            new[n_old:].copy_(old[src].expand_as(new[n_old:]))
        elif not name.endswith("usage") and name not in indexed:
            raise RuntimeError(f"add_tasks: {name} has one row per task but is not a known task-indexed tensor")
    for (_, a), (_, b) in zip(model.moe_layers(), grown.moe_layers(), strict=True):
        b.track_usage = a.track_usage
    grown.grad_checkpointing = model.grad_checkpointing
    return grown.train(model.training)


@dataclass
class FrozenRows:
    """What `freeze` did: which parameters train, and the old-task rows of shared tensors that must not move.

    rows: {name: (parameter, frozen row ids [n])} for task-indexed parameters that train only in new rows.
    """

    mode: str
    new_tasks: list[str]
    trainable: list[str]
    rows: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    handles: list = field(default_factory=list, init=False, repr=False)
    _saved: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the frozen rows exact through `optimizer.step()` (weight decay, carried momentum)."""
        if not self.rows:
            return
        self.handles.append(optimizer.register_step_pre_hook(lambda *_: self._save()))
        self.handles.append(optimizer.register_step_post_hook(lambda *_: self._restore()))

    @torch.no_grad()
    def _save(self) -> None:
        self._saved = {name: p.index_select(0, ids) for name, (p, ids) in self.rows.items()}

    @torch.no_grad()
    def _restore(self) -> None:
        for name, (p, ids) in self.rows.items():
            p.index_copy_(0, ids, self._saved[name])
        self._saved = {}

    def remove(self) -> None:
        """Drop the gradient masks and optimizer hooks (requires_grad flags stay as they are)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _mask_rows(ids: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.index_fill(0, ids.to(grad.device), 0)
    return hook


def freeze(model: MultiTaskViT, mode: str, new_tasks: Sequence[str]) -> FrozenRows:
    """Freeze `model` for training `new_tasks` only (modes in the module docstring); returns the `FrozenRows`
    to `attach` to the optimizer. Sets `requires_grad`, so build the optimizer afterwards: fully frozen
    parameters are then left out of it (and of gradient clipping)."""
    if mode not in FREEZE_MODES:
        raise ConfigError(f"freeze mode must be one of {', '.join(FREEZE_MODES)}; got {mode!r}")
    new_tasks = [new_tasks] if isinstance(new_tasks, str) else list(new_tasks)
    new_ids = [model.task_index(t) for t in new_tasks]
    if mode == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return FrozenRows(mode, new_tasks, [n for n, _ in model.named_parameters()])

    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for task in new_tasks:
        for name, p in model.heads[task].named_parameters():
            p.requires_grad_(True)
            trainable.append(f"heads.{task}.{name}")
    frozen = FrozenRows(mode, new_tasks, trainable)
    if mode == "experts":
        old_ids = [i for i in range(model.num_tasks) if i not in new_ids]
        for name, p in task_indexed_parameters(model).items():
            p.requires_grad_(True)
            trainable.append(name)
            if old_ids:
                ids = torch.tensor(old_ids, device=p.device)
                frozen.rows[name] = (p, ids)
                frozen.handles.append(p.register_hook(_mask_rows(ids)))
    return frozen


__all__ = ["FREEZE_MODES", "FrozenRows", "add_tasks", "freeze", "task_indexed_parameters"]
