"""Expert weights stored expert-first, so a layer with fewer experts is a slice of a bigger one."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import DispatchPlan, grouped_matmul


class GroupedLinear(nn.Module):
    """E independent linear layers applied to rows already sorted by expert (see `dispatch.plan_dispatch`).

    weight: [E, in_features, out_features] (x @ W layout, as grouped_mm takes it), bias: [E, out_features].
    Initialised like timm's ViT linears: trunc_normal_(std=.02), zero bias.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x_sorted: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x_sorted: [S, in_features] sorted by expert -> [S, out_features]."""
        return grouped_matmul(x_sorted, self.weight, plan, self.bias)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


def stacked_columns(owner: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """weight: [E, Din, Dout] -> [Din, E * Dout], the E experts' columns side by side (expert-major), so that
    `x @ result` runs every expert in one matmul. The copy is cached on `owner` while no gradient is needed (the
    cache key is the tensor's storage, version and dtype, so in-place updates and `.to()` invalidate it);
    with autograd or under torch.compile it is recomputed each call."""
    num, din, dout = weight.shape
    if weight.requires_grad and torch.is_grad_enabled() or torch.compiler.is_compiling():
        return weight.permute(1, 0, 2).reshape(din, num * dout)
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
    cache = owner.__dict__.setdefault("_stacked_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, weight.detach().permute(1, 0, 2).reshape(din, num * dout).contiguous())
        cache[name] = hit
    return hit[1]
