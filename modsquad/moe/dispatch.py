"""Token dispatch for mixture-of-experts layers: sort by expert, grouped matmuls, scatter back.

T tokens with top-k routing make S = T * k (token, slot) assignments. `plan_dispatch` sorts them by expert
(stable, so rows of one expert keep token order), after which every expert's rows are one contiguous slice
and all experts run as one grouped matmul (`grouped_matmul`). `combine` puts the rows back in (token, slot)
order and sums the k slots of each token with the gate weights; `sum_by_token` sums rows already scaled by their
gate weights without un-sorting them first.

`grouped_matmul` uses `torch.nn.functional.grouped_mm` where this build runs it, forward and backward, for
the device and dtype at hand (probed once per (device type, dtype) and cached), else one matmul per
non-empty expert. Set the environment variable `MODSQUAD_GROUPED_MM=0` to force the loop (benchmarks), or
`MODSQUAD_GROUPED_MM=auto` to time both once per (device, dtype, shape bucket) in this process and keep the faster
(`auto_choices()`); results then differ by float rounding between machines and processes, since the choice is a
measurement. The default (grouped_mm where supported) is deterministic.

Under `torch.compile` the grouped matmul is the custom op `modsquad::grouped_mm` (with a fake kernel and a
registered backward, both of static shape [S, Dout] / [E, Din, Dout]), so the per-expert row counts, which
are data, never reach the graph; rows move by plain index_selects there, which the compiler differentiates.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

GROUPED_MM_ENV = "MODSQUAD_GROUPED_MM"
#: device types whose index_add is deterministic (serial), so `sum_by_token` may scatter-add rows there
INDEX_ADD_DEVICES = {"cpu"}

_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}
# MODSQUAD_GROUPED_MM=auto: (device type, dtype, rows bucket, experts, Din, Dout) -> use grouped_mm?
_AUTO_CHOICE: dict[tuple, bool] = {}


@dataclass
class DispatchPlan:
    """Where each of the S = T * k (token, slot) assignments goes once rows are sorted by expert.

    order:        [S] long, flat (token * k + slot) index of each sorted row
    inverse:      [S] long, sorted row of each flat (token, slot) index (`inverse[order] = arange(S)`)
    token_index:  [S] long, token of each sorted row (`order // k`)
    expert_index: [S] long, expert of each sorted row (non-decreasing)
    counts:       [E] long, rows per expert
    offsets:      [E] int32, cumulative ends of each expert's slice (the `offs` of grouped_mm)
    """

    order: torch.Tensor
    inverse: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    top_k: int
    _one_hot: dict = field(default_factory=dict, repr=False)

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @cached_property
    def splits(self) -> list[int]:
        """Rows per expert as Python ints (one host sync, only the loop path needs it)."""
        return self.counts.tolist()

    def expert_one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """[S, E] one-hot expert of each sorted row (cached per dtype): sums rows per expert as one matmul."""
        if dtype not in self._one_hot:
            self._one_hot[dtype] = F.one_hot(self.expert_index, self.num_experts).to(dtype)
        return self._one_hot[dtype]


def plan_dispatch(indices: torch.Tensor, num_experts: int) -> DispatchPlan:
    """indices: [T, k] chosen experts per token -> DispatchPlan sorting the T * k assignments by expert."""
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    expert_index, order = torch.sort(flat, stable=True)
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        counts = torch.bincount(flat, minlength=num_experts)
    else:  # scatter_add instead of bincount: bincount sizes its output from the data (a host sync on GPUs)
        counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return DispatchPlan(
        order=order,
        inverse=inverse,
        token_index=torch.div(order, top_k, rounding_mode="floor"),
        expert_index=expert_index,
        counts=counts,
        offsets=counts.cumsum(0, dtype=torch.int32),
        num_tokens=num_tokens,
        top_k=top_k,
    )


# Rows move by gathers (index_select) with hand-written backwards: autograd's default backward of a gather is an
# index_add, which is serial on CPUs and non-deterministic on GPUs. A permutation's backward is a gather by the
# inverse permutation (the plan holds both; a gather measured 1.2-3x faster than the equivalent index_copy scatter
# on CPUs), and the k copies of a token are summed by one index_add on CPUs (serial there, so deterministic), else
# as a dense [T, k, D] reduction.


class _PermuteRows(torch.autograd.Function):
    """rows[perm] for a permutation `perm`; backward gathers the gradient by the inverse permutation."""

    @staticmethod
    def forward(ctx, rows, perm, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherTokens(torch.autograd.Function):
    """x[token_index] (each token k times); backward sums each token's k rows of the gradient: one index_add where
    that is deterministic (CPUs: 3-3.5x faster than un-sorting and summing at 4096 tokens, D 384), else un-sort by
    the inverse permutation and sum the k slots."""

    @staticmethod
    def forward(ctx, x, token_index, inverse, top_k):
        ctx.save_for_backward(token_index, inverse)
        ctx.top_k = top_k
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        token_index, inverse = ctx.saved_tensors
        if grad.device.type in INDEX_ADD_DEVICES:
            return grad.new_zeros(ctx.num_tokens, grad.shape[-1]).index_add_(0, token_index, grad), None, None, None
        rows = grad.index_select(0, inverse)  # (token, slot) order
        return rows.view(-1, ctx.top_k, rows.shape[-1]).sum(dim=1), None, None, None


def _needs_grad(t: torch.Tensor) -> bool:
    """Whether autograd will record an op on `t`; if not, the custom Functions above are skipped (their
    forwards are plain index_selects, so results are identical, minus the Python autograd overhead).
    Under torch.compile the plain ops are always taken: the compiler derives their backward itself."""
    return t.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def gather_tokens(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x: [T, D] -> [S, D], the token of every sorted row (each token appears k times)."""
    if not _needs_grad(x):
        return x.index_select(0, plan.token_index)
    return _GatherTokens.apply(x, plan.token_index, plan.inverse, plan.top_k)


def sort_rows(rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """rows: [T * k, D] in (token, slot) order -> [S, D] sorted by expert."""
    if not _needs_grad(rows):
        return rows.index_select(0, plan.order)
    return _PermuteRows.apply(rows, plan.order, plan.inverse)


def unsort_rows(rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """rows: [S, D] sorted by expert -> [T * k, D] in (token, slot) order."""
    if not _needs_grad(rows):
        return rows.index_select(0, plan.inverse)
    return _PermuteRows.apply(rows, plan.inverse, plan.order)


def combine(y_sorted: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs.

    y_sorted: [S, D] sorted by expert, weights: [T, k] -> [T, D] = sum_i weights[t, i] * y[t, i].
    """
    y = _token_slots(y_sorted, plan)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # one pass over y, unlike (y * w).sum(1)


def sum_by_token(y_sorted: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_sorted: [S, D] sorted by expert, already scaled by the gate weights -> [T, D], the sum of each token's k
    rows: `combine` for rows whose weights were applied earlier on a narrower tensor (MoA's head outputs, hd < D),
    which saves the unsort pass over [S, D]. On CPUs one index_add (serial, so deterministic, and 2.2x faster than
    `combine` at S 18912, D 384, 1 thread); elsewhere, and under torch.compile (whose scatter kernels may add in
    parallel), un-sort and sum: GPU index_add uses atomics, whose order, hence rounding, changes between runs.
    For the MoE MLP, whose expert hidden width is >= D, scaling the hidden rows instead measured slower in
    training (k 2, hidden 768: 1.42x vs 1.32x dense), so it keeps `combine`."""
    if y_sorted.device.type in INDEX_ADD_DEVICES and not torch.compiler.is_compiling():
        out = y_sorted.new_zeros(plan.num_tokens, y_sorted.shape[-1])
        return out.index_add(0, plan.token_index, y_sorted)
    return _token_slots(y_sorted, plan).sum(dim=1)


def _token_slots(y_sorted: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """[S, D] sorted by expert -> [T, k, D] in (token, slot) order (D spelled out: with T = 0 a -1 is ambiguous)."""
    return unsort_rows(y_sorted, plan).view(plan.num_tokens, plan.top_k, y_sorted.shape[-1])


class _AddExpertBias(torch.autograd.Function):
    """out + bias[expert of each row], in place on `out` (one gathered add); the backward sums each expert's rows
    with one matmul against the one-hot experts (autograd's default for a gather, an index_add, is serial on CPUs).
    """

    @staticmethod
    def forward(ctx, out, bias, one_hot, expert_index):
        ctx.save_for_backward(one_hot)
        out.add_(bias.index_select(0, expert_index))
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (one_hot,) = ctx.saved_tensors
        grad_bias = one_hot.t() @ grad if ctx.needs_input_grad[1] else None
        return grad, grad_bias, None, None


class _AddExpertBiasSlices(torch.autograd.Function):
    """out + bias[expert of each row], in place on `out`, as one add per expert over its contiguous slice (no
    gathered [S, Dout] bias copy); the backward sums each expert's slice of the gradient. Needs the split sizes on
    the host (free on CPUs; a device sync elsewhere, where `_AddExpertBias` is used instead)."""

    @staticmethod
    def forward(ctx, out, bias, splits):
        ctx.splits = splits
        _add_slices_(out, bias, splits)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = torch.stack([rows.sum(0) for rows in grad.split(ctx.splits)])
        return grad, grad_bias, None


def _add_expert_bias(out: torch.Tensor, bias: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """out [S, Dout] sorted by expert + bias [E, Dout] of each row's expert (in place on `out` when no gradient is
    recorded). On CPUs one add per expert slice (E small adds cost less than writing and reading a gathered
    [S, Dout] bias: measured 3.2 vs 6.1 ms at S 12608, Dout 384, E 16, 1 thread); elsewhere one gathered add,
    which needs no host sync for the split sizes."""
    grad = _needs_grad(out) or _needs_grad(bias)
    if out.device.type == "cpu":
        return _AddExpertBiasSlices.apply(out, bias, plan.splits) if grad else _add_slices_(out, bias, plan.splits)
    if grad:
        return _AddExpertBias.apply(out, bias, plan.expert_one_hot(out.dtype), plan.expert_index)
    return out.add_(bias.index_select(0, plan.expert_index))


def _add_slices_(out: torch.Tensor, bias: torch.Tensor, splits: list[int]) -> torch.Tensor:
    for rows, b in zip(out.split(splits), bias.unbind(0), strict=True):
        if rows.shape[0]:
            rows.add_(b)
    return out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects expanded grads,
    e.g. the one `out.sum().backward()` sends)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm runs forward and backward correctly here; a tiny probe, cached per (device, dtype)."""
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        _GROUPED_MM_SUPPORT[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_SUPPORT[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    # The backward of grouped_mm is two more grouped_mms (x-grad against the transposed weights, weight-grad
    # as x^T grad per slice); they are called directly rather than through autograd, so that the probe gives
    # the same answer wherever it first runs (under inference_mode, or inside a custom op's kernel).
    if not hasattr(F, "grouped_mm") or device.type == "meta":
        return False
    try:
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(6, 16, generator=gen).to(device, dtype)
            w = torch.randn(2, 16, 16, generator=gen).to(device, dtype)
            g = torch.randn(6, 16, generator=gen).to(device, dtype)
            offs = torch.tensor([2, 6], dtype=torch.int32, device=device)
            got = (F.grouped_mm(x, w, offs=offs), F.grouped_mm(g, w.transpose(1, 2), offs=offs),
                   F.grouped_mm(x.t(), g, offs=offs))
            ref = (torch.cat([x[:2] @ w[0], x[2:] @ w[1]]), torch.cat([g[:2] @ w[0].t(), g[2:] @ w[1].t()]),
                   torch.stack([x[:2].t() @ g[:2], x[2:].t() @ g[2:]]))
        tol = dict(rtol=5e-2, atol=5e-1)  # catches wrong results, not rounding (bf16 sums of 16 products)
        return all(torch.allclose(a.float(), b.float(), **tol) for a, b in zip(got, ref, strict=True))
    except Exception:  # any failure (missing kernel, dtype, device capability) means: use the loop
        return False


def _grouped_mm_mode() -> str:
    """`MODSQUAD_GROUPED_MM`: "off" (0/false/no/off), "auto", or "on" (anything else, the default)."""
    value = os.environ.get(GROUPED_MM_ENV, "1").strip().lower()
    return "off" if value in ("0", "false", "no", "off") else "auto" if value == "auto" else "on"


def auto_choices() -> dict[tuple, str]:
    """What `MODSQUAD_GROUPED_MM=auto` picked so far: {(device, dtype, rows bucket, E, Din, Dout): "grouped_mm" |
    "loop"} (a copy, for reports)."""
    return {key: "grouped_mm" if grouped else "loop" for key, grouped in _AUTO_CHOICE.items()}


def _rows_bucket(rows: int) -> int:
    """Shape bucket of `rows` for the auto choice: the next power of two (timing is re-done per bucket)."""
    return 1 << max(rows - 1, 0).bit_length()


def _time_min(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _auto_prefers_grouped(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Time grouped_mm against the per-expert loop on these very inputs once per (device, dtype, rows bucket,
    shape) and cache the faster. Both run forward only, without autograd (the backward is two more grouped
    matmuls of the same sizes, so it follows the forward's ranking)."""
    key = (x_sorted.device.type, x_sorted.dtype, _rows_bucket(x_sorted.shape[0]), *weight.shape)
    if key not in _AUTO_CHOICE:
        with torch.no_grad():
            x, w = x_sorted.detach().contiguous(), weight.detach().contiguous()
            splits = _splits(offsets)
            sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

            def grouped():
                F.grouped_mm(x, w, offs=offsets)
                sync()

            def loop():
                _loop_matmul(x, w, splits)
                sync()

            grouped(), loop()  # warm-up (kernels, allocator)
            t_grouped, t_loop = _time_min(grouped), _time_min(loop)
        _AUTO_CHOICE[key] = t_grouped <= t_loop
    return _AUTO_CHOICE[key]


def _use_grouped_mm(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> bool:
    """The default choice for these rows and weights [E, Din, Dout] (env, support, alignment, auto timing)."""
    if x_sorted.shape[0] == 0 or not _grouped_mm_usable(x_sorted, weight.shape[1:]):
        return False
    if _grouped_mm_mode() == "auto":
        return _auto_prefers_grouped(x_sorted, weight, offsets)
    return True


def _grouped_mm_usable(x: torch.Tensor, weight_dims: tuple[int, int]) -> bool:
    """Whether grouped_mm can run for rows `x` and expert weights of shape [E, *weight_dims]."""
    if _grouped_mm_mode() == "off":
        return False
    # grouped GEMM kernels need 16-byte aligned row strides
    if any(d * x.element_size() % 16 for d in weight_dims):
        return False
    return grouped_mm_supported(x.device, x.dtype)


def _loop_matmul(x_sorted: torch.Tensor, weight: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """One matmul per non-empty expert. x_sorted: [S, Din], weight: [E, Din, Dout] -> [S, Dout]."""
    # unbind once: indexing weight[e] per expert would make its backward build E full-size zero tensors
    experts = weight.unbind(0)
    parts = [chunk @ experts[e] for e, chunk in enumerate(x_sorted.split(splits)) if chunk.shape[0] > 0]
    return torch.cat(parts) if parts else x_sorted.new_zeros(0, weight.shape[-1])


def _splits(offsets: torch.Tensor) -> list[int]:
    """offsets: [E] cumulative row ends -> rows per expert as Python ints (one host sync)."""
    return torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()


# torch.compile path: custom ops whose shapes do not depend on the routing (the native grouped_mm's fake kernel
# rejects float32, and the loop's per-expert split sizes are data). Eager calls skip them: dispatching a custom op
# costs more per call than the direct calls below.


@torch.library.custom_op("modsquad::grouped_mm", mutates_args=())
def _grouped_mm_op(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x_sorted: [S, Din] sorted by expert, weight: [E, Din, Dout], offsets: [E] int32 row ends -> [S, Dout]."""
    if _use_grouped_mm(x_sorted, weight, offsets):
        return F.grouped_mm(x_sorted.contiguous(), weight, offs=offsets)
    return _loop_matmul(x_sorted, weight, _splits(offsets)).contiguous()


@_grouped_mm_op.register_fake
def _grouped_mm_fake(x_sorted, weight, offsets):
    return x_sorted.new_empty(x_sorted.shape[0], weight.shape[-1])


@torch.library.custom_op("modsquad::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x_sorted: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Gradient of the expert weights: x_sorted: [S, Din], grad: [S, Dout] -> [E, Din, Dout] (zero for experts
    without rows): expert e gets x_e^T grad_e over its rows."""
    if x_sorted.shape[0] > 0 and _grouped_mm_usable(x_sorted, (x_sorted.shape[1], grad.shape[1])):
        return F.grouped_mm(x_sorted.t(), grad, offs=offsets)
    out = x_sorted.new_zeros(offsets.shape[0], x_sorted.shape[1], grad.shape[1])
    splits = _splits(offsets)
    rows = zip(x_sorted.split(splits), grad.split(splits), strict=True)
    for e, (x_e, g_e) in enumerate(rows):
        if x_e.shape[0] > 0:
            torch.matmul(x_e.t(), g_e, out=out[e])
    return out


@_grouped_mm_weight_grad_op.register_fake
def _grouped_mm_weight_grad_fake(x_sorted, grad, offsets):
    return x_sorted.new_empty(offsets.shape[0], x_sorted.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x_sorted, weight, offsets = inputs
    ctx.save_for_backward(x_sorted, weight, offsets)


def _grouped_mm_backward(ctx, grad):
    x_sorted, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the expanded gradient of `out.sum()`
    grad_x = _grouped_mm_op(grad, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_weight_grad_op(x_sorted, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_matmul(x_sorted: torch.Tensor, weight: torch.Tensor, plan: DispatchPlan,
                   bias: torch.Tensor | None = None, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """Per-expert matmul over contiguous slices: rows of expert e are multiplied by `weight[e]`.

    x_sorted: [S, Din] sorted by expert, weight: [E, Din, Dout], bias: [E, Dout] or None -> [S, Dout].
    `use_grouped_mm=None` picks grouped_mm when supported and not disabled by `MODSQUAD_GROUPED_MM=0`
    (`MODSQUAD_GROUPED_MM=auto`: whichever measured faster for this shape bucket, see the module docstring).
    Under torch.compile this is the custom op `modsquad::grouped_mm` (same choice, made when it runs).
    """
    if torch.is_autocast_enabled(x_sorted.device.type):
        dtype = torch.get_autocast_dtype(x_sorted.device.type)
        x_sorted, weight = x_sorted.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if torch.compiler.is_compiling():
        out = _grouped_mm_op(x_sorted, weight, plan.offsets)
        return out if bias is None else out + bias.index_select(0, plan.expert_index)
    if use_grouped_mm is None:
        use_grouped_mm = _use_grouped_mm(x_sorted, weight, plan.offsets)
    grouped = use_grouped_mm and x_sorted.shape[0] > 0
    if grouped:
        out = F.grouped_mm(x_sorted.contiguous(), weight.contiguous(), offs=plan.offsets)
    else:
        out = _loop_matmul(x_sorted, weight, plan.splits)
    if bias is not None:
        out = _add_expert_bias(out, bias, plan)
    if grouped and out.requires_grad:
        out = _ContiguousGrad.apply(out)
    return out
