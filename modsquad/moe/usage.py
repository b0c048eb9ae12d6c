"""Expert usage: how often each task picks each expert, and which experts to keep when extracting a task.

Counts are top-k selections: a token with top-k routing adds 1 to each of its k experts, so a task's row
sums to k * tokens. Shares (`usage_share`) normalise a row to sum 1. Kept experts are returned as sorted
expert ids; a task always keeps at least `min_keep` experts (the layer's top_k, so routing still works) and
ties between equally used experts go to the lower id.
"""

from __future__ import annotations

import torch


def count_selections(indices: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                     num_experts: int) -> torch.Tensor:
    """indices: [T, k], task_ids: [T] -> int64 [num_tasks, E] number of times each task chose each expert."""
    flat = (task_ids.reshape(-1, 1) * num_experts + indices).reshape(-1)
    counts = torch.zeros(num_tasks * num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(num_tasks, num_experts)


def add_selections_(usage: torch.Tensor, indices: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """usage: int64 [num_tasks, E] += count_selections(indices, task_ids, ...), in place: one scatter_add into
    the counts, without the temporary [num_tasks, E] tensor (it runs in every MoE layer's forward)."""
    flat = (task_ids.reshape(-1, 1) * usage.shape[1] + indices).reshape(-1)
    usage.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
    return usage


def usage_share(counts: torch.Tensor) -> torch.Tensor:
    """counts: [..., E] -> float64 shares along the last dim, each row sums to 1 (all-zero rows stay 0)."""
    counts = torch.as_tensor(counts).to(torch.float64)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)


def _by_usage(counts_row: torch.Tensor) -> torch.Tensor:
    """Expert ids from most to least used; ties in the order of the ids (stable sort)."""
    return torch.sort(counts_row, descending=True, stable=True).indices


def _as_row(counts_row) -> torch.Tensor:
    row = torch.as_tensor(counts_row).detach().to("cpu", torch.float64)
    if row.dim() != 1:
        raise ValueError(f"expected one task's counts [E], got shape {tuple(row.shape)}")
    return row


def _keep(order: torch.Tensor, num: int, min_keep: int) -> torch.Tensor:
    num = min(max(num, min_keep), order.numel())
    return order[:num].sort().values


def experts_over_threshold(counts_row, threshold: float, min_keep: int = 1) -> torch.Tensor:
    """Experts whose share of the task's selections is >= threshold (Mod-Squad's usage threshold).

    counts_row: [E] -> sorted long ids; the most used experts fill up to `min_keep`.
    """
    row = _as_row(counts_row)
    num = int((usage_share(row) >= threshold).sum()) if row.sum() > 0 else 0
    return _keep(_by_usage(row), num, min_keep)


def experts_for_mass_count(counts_row, mass: float) -> int:
    """How many of the most used experts carry at least `mass` (0..1) of the task's selections (0 if unused)."""
    if not 0.0 <= mass <= 1.0:
        raise ValueError(f"mass must be in [0, 1], got {mass}")
    row = _as_row(counts_row)
    total = float(row.sum())
    if total <= 0 or mass == 0:
        return 0
    carried = row[_by_usage(row)].cumsum(0)
    # tolerance so that mass = 1.0 is met by the exact total despite float rounding of `mass * total`
    return int((carried < mass * total * (1 - 1e-12)).sum()) + 1


def experts_for_mass(counts_row, mass: float, min_keep: int = 1) -> torch.Tensor:
    """Smallest set of most used experts that carries `mass` of the task's selections, at least `min_keep`.

    counts_row: [E] -> sorted long ids.
    """
    row = _as_row(counts_row)
    return _keep(_by_usage(row), experts_for_mass_count(row, mass), min_keep)
