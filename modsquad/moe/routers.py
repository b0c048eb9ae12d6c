"""Routers: which k of E experts each token uses, and with what weight.

Every router maps tokens `x: [T, D]` and their task ids `task_ids: [T]` to a `RouterOutput`:

    probs    [T, E]  full softmax over all experts (float32, or float64 for float64 inputs): for aux losses
    indices  [T, k]  the chosen experts, best first (ties go to the lower expert id)
    weights  [T, k]  the gate values of the chosen experts, by `gate_values` (`GATE_VALUES`):
                     "topk_probs"    the chosen experts' entries of `probs`, not renormalised (the official
                                     Mod-Squad code: probs = softmax(logits) + 1e-4, gates = top-k of probs);
                                     the router then learns from the task loss even with top_k = 1
                     "renormalized"  softmax over the k chosen logits only (sum 1; with top_k = 1 the weight
                                     is always 1 and the task loss gives the router no gradient)
    logits   [T, E]  the logits the choice was made from (pre-softmax, for the router z-loss)

`probs` includes the `PROB_EPS` (1e-4) that the official code adds when gate values are "topk_probs".
A router may keep gate rows for more experts than its layer holds (`kept_experts`, set when a task is extracted
with "topk_probs" gates): the softmax then runs over all `num_gate_rows` rows, so that the gate values of the
kept experts are unchanged, and the choice is made among the kept experts only; `probs`, `logits` and `indices`
are then over the kept experts (columns `kept_experts` of the full ones).

Kinds (built-in `ROUTERS`; `@register_router("name")` adds one, `build_router(name, ...)` builds any):
    per_task          one linear gate per task on the token (Mod-Squad; M3ViT's multi-gate)
    task_conditioned  one shared gate on concat(token, learned task embedding) (task-aware gating, Gupta et al.)
    task_level        one decision per (task, layer) from learned task logits; every token of a task uses the
                      same experts (task-level MoE, Ye et al.)
    shared            one gate for all tasks (the plain MoE baseline)
A router describes itself (`Router`: task-indexed parameters, gate rows, slicing, growing, fixed routing), so a
new router is one class in one file; see docs/architecture.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UnknownNameError
from .rebuild import Rebuildable

TASK_LEVEL_MODES = ("softmax", "gumbel", "gumbel_st")
GATE_VALUES = ("topk_probs", "renormalized")
PROB_EPS = 1e-4  # added to the softmax by the official code before top-k when gate values are raw probs


class RouterOutput(NamedTuple):
    """Routing of T tokens over E experts with top-k (shapes in the module docstring)."""

    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor


def token_task_ids(task_ids: torch.Tensor | int, leading_shape: torch.Size | tuple[int, ...],
                   device: torch.device | None = None) -> torch.Tensor:
    """Task id of every token, flattened to [T].

    `task_ids` may be an int (one task for all tokens), per sample `[B]` for `leading_shape = (B, N)`, or per
    token with the tokens' own shape (`[B, N]`, or `[T]` for `leading_shape = (T,)`). Branches on ranks only,
    so that tracing for export records no shape-dependent Python decisions.
    """
    if isinstance(task_ids, torch.Tensor):
        task_ids = task_ids.to(device=device, dtype=torch.long)
    else:
        task_ids = torch.as_tensor(task_ids, dtype=torch.long, device=device)
    try:
        if task_ids.dim() == 0:
            return task_ids.expand(leading_shape).reshape(-1)
        if task_ids.dim() == 1 and len(leading_shape) == 2:
            return task_ids[:, None].expand(leading_shape).reshape(-1)
        if task_ids.dim() == len(leading_shape):
            return task_ids.expand(leading_shape).reshape(-1)
    except RuntimeError:
        pass
    raise ValueError(f"task_ids of shape {tuple(task_ids.shape)} do not match tokens of shape {tuple(leading_shape)}")


def shared_task(task_ids: torch.Tensor) -> torch.Tensor | None:
    """[1] long task id when every token has the same one because `token_task_ids` expanded a single id (a
    stride-0 view; no values are read, so no host sync), else None. Routers then compute only that task's gate."""
    if is_exporting() or task_ids.dim() != 1 or task_ids.stride(0) != 0 or task_ids.shape[0] == 0:
        return None  # exporters trace the general path, which any task ids take
    return task_ids[:1]


def is_exporting() -> bool:
    """True while tracing or exporting (torch.jit.trace, torch.onnx.export, torch.export): MoE layers then take
    their static-shape path (every expert on every token) and skip side effects such as usage counting."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or bool(exporting and exporting())


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    """Routing maths in at least float32 (bf16 softmax/top-k would make near-ties flip between runs)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def route_top_k(logits: torch.Tensor, top_k: int, gate_values: str = "renormalized",
                kept_experts: torch.Tensor | None = None) -> RouterOutput:
    """Top-k routing from logits [T, G] over G gate rows (`gate_values` and `kept_experts` in the module
    docstring; without `kept_experts` the G rows are the E experts)."""
    logits = _float_logits(logits)
    probs = logits.softmax(dim=-1)
    if gate_values == "topk_probs":
        probs = probs + PROB_EPS
    if kept_experts is not None:  # the softmax saw every gate row; the choice sees the kept experts only
        logits, probs = logits[:, kept_experts], probs[:, kept_experts]
    if is_exporting():  # exporters lack a stable sort; exact ties do not occur in trained routers
        top_logits, indices = logits.topk(top_k, dim=-1)
    else:  # a stable sort, not topk: ties (e.g. zero-initialised gates) go to the lower expert id on every device
        top_logits, indices = logits.sort(dim=-1, descending=True, stable=True)
        top_logits, indices = top_logits[:, :top_k], indices[:, :top_k]
    weights = probs.gather(1, indices) if gate_values == "topk_probs" else top_logits.softmax(dim=-1)
    return RouterOutput(probs, indices, weights, logits)


class Router(Rebuildable):
    """Base class: subclasses compute gate logits [T, num_gate_rows]; routing from logits is `route_top_k`.

    `num_experts` is the number of experts the router chooses from (the layer's experts); `num_gate_rows` is
    the number of gate rows (= num_experts, unless `kept_experts` keeps the rows of dropped experts too).

    A router describes itself, so that growing, extracting and counting need no per-class code:
        task_parameters()   {name: tensor} with one row per task along dim 0 (all the router knows of a task)
        gate_row_dims()     {name: dim} of the tensors with one entry per gate row (expert) along `dim`
        slice(task, experts)   a one-task router over a subset of the experts (extraction)
        grow(n_new, init_from) a router for more tasks (adding tasks to a trained model)
        fixed_routing       True when every token of a task gets the same experts and weights in eval, so that
                            the layer folds to a dense one (`fixed_choice(task)` gives them)
        label(router_kwargs)   a short name for tables, e.g. "task_level/gumbel_st"
    The defaults of `slice` and `grow` work from the first two declarations; subclasses override them only for
    state that is neither per task nor per gate row yet still changes shape.
    """

    kind: str = ""  # the registry name, set by `register_router`
    fixed_routing: bool = False

    def __init__(self, num_experts: int, top_k: int, num_tasks: int, gate_values: str = "renormalized",
                 kept_experts: list[int] | None = None):
        super().__init__()
        if gate_values not in GATE_VALUES:
            raise UnknownNameError(f"unknown gate_values {gate_values!r}; choose one of {GATE_VALUES}")
        self.num_gate_rows = num_experts
        if kept_experts is not None:
            kept = [int(e) for e in kept_experts]
            if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= num_experts:
                raise ValueError(f"kept_experts must be sorted distinct ids in [0, {num_experts}), got {kept_experts}")
            num_experts = len(kept)
            self.register_buffer("kept_experts", torch.tensor(kept, dtype=torch.long), persistent=False)
        else:
            self.kept_experts = None
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.gate_values = gate_values

    def gate_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route(self, logits: torch.Tensor, top_k: int | None = None) -> RouterOutput:
        """RouterOutput from gate logits [T, num_gate_rows] with this router's gate values and kept experts."""
        return route_top_k(logits, self.top_k if top_k is None else top_k, self.gate_values, self.kept_experts)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> RouterOutput:
        """x: [T, D], task_ids: [T] long -> RouterOutput."""
        return self.route(self.gate_logits(x, task_ids))

    def extra_repr(self) -> str:
        rows = f", gate_rows={self.num_gate_rows}" if self.kept_experts is not None else ""
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, num_tasks={self.num_tasks}, "
                f"gate_values={self.gate_values}{rows}")

    # --- self-description -------------------------------------------------------------------------------

    def task_parameters(self) -> dict[str, torch.Tensor]:
        """{name (relative to the router): tensor [num_tasks, ...]} of everything indexed by task on dim 0."""
        return {}

    def gate_row_dims(self) -> dict[str, int]:
        """{name: dim} of the tensors that hold one entry per gate row (expert) along `dim`."""
        return {}

    @classmethod
    def label(cls, router_kwargs: dict | None = None) -> str:
        """Short name of this router with `router_kwargs` for tables and plots (the registry name by default)."""
        return cls.kind

    def gate_rows_of(self, experts) -> torch.Tensor:
        """Gate rows (long [n], on CPU) of expert ids of this router (sorted distinct, in [0, num_experts))."""
        ids = [int(e) for e in experts]
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_experts:
            raise ValueError(f"experts must be sorted distinct ids in [0, {self.num_experts}), got {ids}")
        ids = torch.tensor(ids, dtype=torch.long)
        return self.kept_experts.cpu()[ids] if self.kept_experts is not None else ids

    def slice(self, task: int, experts) -> Router:
        """A one-task router that routes like task `task` of this one among `experts` (sorted expert ids).

        "renormalized" gates keep only those experts' gate rows. "topk_probs" gates are softmax probabilities
        over every gate row, so the new router keeps all of the task's gate rows (they are tiny) and chooses
        among `experts` only (`kept_experts`): a token whose chosen experts are all kept gets the same experts
        with the same weights.
        """
        rows = self.gate_rows_of(experts)
        kept = None
        if self.gate_values == "topk_probs":
            kept = None if rows.tolist() == list(range(self.num_gate_rows)) else rows.tolist()
            rows = torch.arange(self.num_gate_rows)
        new = self.rebuilt(num_tasks=1, num_experts=len(rows), kept_experts=kept)
        new.load_state_dict(self.sliced_state(task, rows))
        return new

    def sliced_state(self, task: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """This router's state_dict cut to task `task` (`task_parameters`) and gate rows `rows` (`gate_row_dims`)."""
        by_task, dims = set(self.task_parameters()), self.gate_row_dims()
        state = {}
        for name, value in self.state_dict().items():
            if name in by_task:
                value = value[task:task + 1]
            if name in dims:
                value = value.index_select(dims[name], rows.to(value.device))
            state[name] = value.detach().clone()
        return state

    @torch.no_grad()
    def grow(self, n_new: int, init_from: int | None = None) -> Router:
        """A router for `num_tasks + n_new` tasks: every tensor copied; the task-indexed ones get `n_new` rows
        initialised as a new router's, or as copies of task `init_from`'s row (the new tasks then route
        exactly as that task)."""
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}")
        n_old = self.num_tasks
        new = self.rebuilt(num_tasks=n_old + n_new)
        by_task, new_state = set(self.task_parameters()), new.state_dict()
        for name, old in self.state_dict().items():
            dst = new_state[name]
            if name in by_task:
                dst[:n_old].copy_(old)
                if init_from is not None:
                    dst[n_old:].copy_(old[init_from].expand_as(dst[n_old:]))
            elif dst.shape == old.shape:
                dst.copy_(old)
            else:
                raise RuntimeError(f"{type(self).__name__}.{name} changes shape with the number of tasks "
                                   f"({tuple(old.shape)} -> {tuple(dst.shape)}) but is not in task_parameters()")
        return new

    @torch.no_grad()
    def fixed_choice(self, task: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [k], weights [k]) that every token of task `task` gets in eval (`fixed_routing` only)."""
        if not self.fixed_routing:
            raise ValueError(f"{type(self).__name__} routes per token: it has no fixed routing per task")
        ref = next(iter(self.parameters()))
        was_training = self.training
        self.eval()
        try:  # the router does not look at the token, only at its dtype and device
            route = self(ref.new_zeros(1, self.init_args().get("dim", 1)), torch.tensor([task], device=ref.device))
        finally:
            self.train(was_training)
        return route.indices[0], route.weights[0]


_REGISTRY: dict[str, type[Router]] = {}


def register_router(name: str):
    """Class decorator: make a `Router` subclass buildable by name (`build_router`, model option `router=`).

    The class takes `(dim, num_experts, top_k, num_tasks, **options)` and passes `gate_values` and
    `kept_experts` on to `Router.__init__`; it declares its `task_parameters()` and `gate_row_dims()`.
    """
    if not isinstance(name, str) or not name.isidentifier() or name == "dense":
        raise ValueError(f"a router name must be an identifier other than 'dense', got {name!r}")

    def register(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"@register_router({name!r}) decorates Router subclasses, not {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"router {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return register


def router_names() -> tuple[str, ...]:
    """Names of every registered router (the built-in `ROUTERS` and any registered since)."""
    return tuple(_REGISTRY)


def router_class(name: str) -> type[Router]:
    """The router class registered as `name`; UnknownNameError otherwise."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown router {name!r}; choose one of {router_names()}")
    return _REGISTRY[name]


def _init_gate(weight: torch.Tensor, init_std: float) -> None:
    """Zeros (uniform start) for init_std == 0, else trunc_normal_(std=init_std) as timm's Linear init."""
    if init_std < 0:
        raise ValueError(f"init_std must be >= 0, got {init_std}")
    with torch.no_grad():
        if init_std > 0:
            nn.init.trunc_normal_(weight, std=init_std)
        else:
            weight.zero_()


@register_router("per_task")
class PerTaskRouter(Router):
    """One bias-free linear gate per task (Mod-Squad / M3ViT multi-gate): logits = x @ weight[task].T.

    `weight: [num_tasks, E, D]` is zero-initialised by default, so every task starts from uniform probabilities;
    `init_std > 0` draws it from trunc_normal(std) instead (what the official code ends up with: its zero init is
    overwritten by the model's timm weight init). With `noisy=True`, Shazeer et al.'s noisy top-k gating adds
    `randn * softplus(x @ noise_weight[task].T)` to the logits in training mode only (`noise_weight` zero-initialised).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int, noisy: bool = False,
                 init_std: float = 0.0, **routing):
        super().__init__(num_experts, top_k, num_tasks, **routing)
        self.noisy = noisy
        self.weight = nn.Parameter(torch.zeros(num_tasks, self.num_gate_rows, dim))
        self.noise_weight = nn.Parameter(torch.zeros(num_tasks, self.num_gate_rows, dim)) if noisy else None
        _init_gate(self.weight, init_std)

    def task_parameters(self) -> dict[str, torch.Tensor]:
        own = {"weight": self.weight, "noise_weight": self.noise_weight}
        return {name: p for name, p in own.items() if p is not None}

    def gate_row_dims(self) -> dict[str, int]:
        return {name: 1 for name in self.task_parameters()}  # [num_tasks, E, D]

    @classmethod
    def label(cls, router_kwargs: dict | None = None) -> str:
        return cls.kind + ("/noisy" if (router_kwargs or {}).get("noisy") else "")

    def _per_task_linear(self, x: torch.Tensor, weight: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        # One task for every token (one-task inference, an extracted model): only that task's gate.
        # Otherwise all tasks' gates in one matmul, then pick each token's task: [T, n_tasks * E] is small next to
        # the experts, and this needs no host sync and no per-task loop.
        if self.num_tasks == 1:
            return x @ weight[0].t()
        task = shared_task(task_ids)
        if task is not None:
            return x @ weight.index_select(0, task)[0].t()
        num_tasks, num_experts, dim = weight.shape
        all_logits = (x @ weight.reshape(num_tasks * num_experts, dim).t()).view(-1, num_tasks, num_experts)
        return all_logits.gather(1, task_ids.reshape(-1, 1, 1).expand(-1, 1, num_experts)).squeeze(1)

    def gate_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self._per_task_linear(x, self.weight, task_ids)
        if self.noise_weight is not None and self.training:
            logits = _float_logits(logits)
            std = F.softplus(_float_logits(self._per_task_linear(x, self.noise_weight, task_ids)))
            logits = logits + torch.randn_like(logits) * std
        return logits


@register_router("task_conditioned")
class TaskConditionedRouter(Router):
    """One shared gate `Linear(dim + task_dim, E)` over concat(token, task embedding) (Gupta et al.).

    The task embedding `task_embed: [num_tasks, task_dim]` belongs to the router and starts at unit scale (like
    a layer-normed token) so the zero-initialised gate can learn from it; the gate starts uniform. The
    concatenation is never materialised: the gate's token and task columns are applied separately.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int, task_dim: int | None = None,
                 init_std: float = 0.0, **routing):
        super().__init__(num_experts, top_k, num_tasks, **routing)
        self.dim = dim
        self.task_dim = task_dim or dim
        self.task_embed = nn.Parameter(torch.randn(num_tasks, self.task_dim))
        self.gate = nn.Linear(dim + self.task_dim, self.num_gate_rows)
        _init_gate(self.gate.weight, init_std)
        nn.init.zeros_(self.gate.bias)

    def task_parameters(self) -> dict[str, torch.Tensor]:
        return {"task_embed": self.task_embed}

    def gate_row_dims(self) -> dict[str, int]:
        return {"gate.weight": 0, "gate.bias": 0}

    def gate_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        w_token, w_task = self.gate.weight.split([self.dim, self.task_dim], dim=1)
        task_logits = F.linear(self.task_embed, w_task, self.gate.bias)  # [num_tasks, E]
        return x @ w_token.t() + task_logits[task_ids]


@register_router("task_level")
class TaskLevelRouter(Router):
    """One routing decision per (task, layer) from learned task logits `task_logits: [num_tasks, E]` (Ye et al.).

    Every token of a task gets the same experts and weights; the input tokens are not looked at.
    Modes (training; eval is always deterministic: top-k of `task_logits`, no noise):
        softmax    top-k of the task logits, weights = softmax over the chosen logits.
        gumbel     Gumbel-top-k: one Gumbel sample per task and forward is added to the logits and divided by
                   `tau`; top-k of that is a sample of k experts without replacement, weights = softmax over the
                   chosen perturbed logits. `probs`/`logits` are the perturbed ones.
        gumbel_st  straight-through Gumbel: the same sampled experts, but the forward uses hard weights 1/k
                   (as in eval) while the gradient flows as if the weights were the full softmax
                   probabilities of the chosen experts, so every expert's logit learns (also for k = 1).
    `task_logits` start as small random values (std `init_std`): near-uniform probabilities, but tasks do not
    all tie on the same first k experts, which a task-level decision without noise could never leave.
    In eval the routing is fixed per task (`fixed_routing`), so an extracted task's layers fold to dense ones.
    """

    fixed_routing = True

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int, mode: str = "softmax",
                 tau: float = 1.0, init_std: float = 0.02, **routing):
        super().__init__(num_experts, top_k, num_tasks, **routing)
        if mode not in TASK_LEVEL_MODES:
            raise UnknownNameError(f"unknown task_level router mode {mode!r}; choose one of {TASK_LEVEL_MODES}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.mode = mode
        self.tau = tau
        self.task_logits = nn.Parameter(torch.randn(num_tasks, self.num_gate_rows) * init_std)

    def task_parameters(self) -> dict[str, torch.Tensor]:
        return {"task_logits": self.task_logits}

    def gate_row_dims(self) -> dict[str, int]:
        return {"task_logits": 1}

    @classmethod
    def label(cls, router_kwargs: dict | None = None) -> str:
        return f"{cls.kind}/{(router_kwargs or {}).get('mode') or 'softmax'}"

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> RouterOutput:
        """x: [T, D] (only its dtype/device matter), task_ids: [T] -> RouterOutput, identical within a task."""
        logits = _float_logits(self.task_logits)
        if self.mode == "softmax" or not self.training:
            route = self.route(logits)
            if self.mode == "gumbel_st":
                route = route._replace(weights=torch.full_like(route.weights, 1.0 / self.top_k))
        else:
            gumbel = -torch.empty_like(logits).exponential_().log()
            route = self.route((logits + gumbel) / self.tau)
            if self.mode == "gumbel_st":
                soft = route.probs.gather(1, route.indices)
                route = route._replace(weights=soft - soft.detach() + 1.0 / self.top_k)
        return RouterOutput(*(t[task_ids] for t in route))


@register_router("shared")
class SharedRouter(Router):
    """One bias-free linear gate for every task (plain MoE baseline), zero-initialised (uniform start) unless
    `init_std > 0` (trunc_normal)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int = 1, init_std: float = 0.0,
                 **routing):
        super().__init__(num_experts, top_k, num_tasks, **routing)
        self.gate = nn.Linear(dim, self.num_gate_rows, bias=False)
        _init_gate(self.gate.weight, init_std)

    def gate_row_dims(self) -> dict[str, int]:
        return {"gate.weight": 0}

    def gate_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


#: the built-in routers; `router_names()` also lists those registered since
ROUTERS = ("per_task", "task_conditioned", "task_level", "shared")


def build_router(kind: str, dim: int, num_experts: int, top_k: int, num_tasks: int, **kwargs) -> Router:
    """Router by registered name (`router_names()`); kwargs go to its constructor (e.g. `noisy=True`,
    `mode="gumbel_st"`, `gate_values=...`)."""
    return router_class(kind)(dim, num_experts, top_k, num_tasks, **kwargs)
