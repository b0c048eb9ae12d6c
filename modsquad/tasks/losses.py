"""Per-task training losses, chosen by `TaskSpec.loss`.

Every loss takes the head output and the loader's target/mask for a batch (layouts in `tasks/registry.py`
with a leading B dim) and returns a float32 scalar averaged over valid elements. A batch in which nothing
is valid gives a zero that still has a `grad_fn`, so the backward pass and gradient all-reduce run the same
on every rank. Dense predictions are resized to the target size (bilinear); labels are never resized.

A new loss is one function and one entry in `TASK_LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import UnknownNameError
from .registry import IGNORE_INDEX, TaskSpec

#: Positive-class weight for edge BCE (Vandenhende et al., PASCAL-MT / MTI-Net): edges are ~5% of pixels.
EDGE_POS_WEIGHT = 0.95


def resize_to_target(pred: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """pred: [B, C, h, w] -> [B, C, H, W] (bilinear) when the head runs at another resolution than the labels."""
    size = tuple(size)
    if pred.shape[-2:] == size:
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


def dense_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """mask: None, [B, H, W] or [B, 1, H, W] -> bool [B, H, W] on `like`'s device (None = all valid)."""
    b, h, w = like.shape[0], like.shape[-2], like.shape[-1]
    if mask is None:
        return torch.ones(b, h, w, dtype=torch.bool, device=like.device)
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.shape != (b, h, w):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match target [B, H, W] = {(b, h, w)}")
    return mask.to(device=like.device, dtype=torch.bool)


def _clean_target(target: Tensor, valid: Tensor) -> Tensor:
    """Zero the target outside `valid` so NaN/inf there cannot leak into gradients (0 * NaN = NaN)."""
    return torch.where(valid[:, None], target.float(), target.new_zeros((), dtype=torch.float32))


def _masked_mean(values: Tensor, valid: Tensor, weight: int = 1) -> Tensor:
    """Mean of `values` [B, H, W] over `valid` pixels (x `weight` channels); 0 with a grad_fn when none are."""
    total = torch.where(valid, values, values.new_zeros(())).sum()
    return total / (valid.sum() * weight).clamp_min(1)


def l1_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean |pred - target| over valid pixels and all channels. pred, target: [B, C, H, W]; mask [B, H, W]."""
    pred = resize_to_target(pred.float(), target.shape[-2:])
    valid = dense_mask(mask, target)
    err = (pred - _clean_target(target, valid)).abs().sum(dim=1)
    return _masked_mean(err, valid, weight=pred.shape[1])


def mse_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over valid elements; the official Mod-Squad loss for curvature and class vectors.

    Dense: pred, target [B, C, H, W], mask [B, H, W]. Classification: pred (logits) and target [B, C], mask [B]
    (the official code regresses the class logits onto the softmaxed label vector).
    """
    if pred.dim() == 2:
        err = (pred.float() - target.float()).pow(2).mean(dim=-1)
        valid = torch.ones_like(err, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
        err = torch.where(valid, err, err.new_zeros(()))
        return err.sum() / valid.sum().clamp_min(1)
    pred = resize_to_target(pred.float(), target.shape[-2:])
    valid = dense_mask(mask, target)
    err = (pred - _clean_target(target, valid)).pow(2).sum(dim=1)
    return _masked_mean(err, valid, weight=pred.shape[1])


def cosine_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean (1 - cos(pred, target)) over valid pixels; pred is normalised here. pred, target: [B, 3, H, W]."""
    pred = resize_to_target(pred.float(), target.shape[-2:])
    valid = dense_mask(mask, target)
    cos = (F.normalize(pred, dim=1) * F.normalize(_clean_target(target, valid), dim=1)).sum(dim=1)
    return _masked_mean(1.0 - cos, valid)


def cross_entropy_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Pixel cross-entropy. pred: logits [B, C, H, W]; target: long [B, H, W] with IGNORE_INDEX unlabelled."""
    pred = resize_to_target(pred.float(), target.shape[-2:])
    target = target.long()
    if mask is not None:
        target = torch.where(dense_mask(mask, target), target, torch.full_like(target, IGNORE_INDEX))
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def soft_cross_entropy_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Soft-label cross-entropy -sum_c t_c log softmax(p)_c, averaged over valid samples.

    pred: logits [B, C]; target: probabilities [B, C]; mask: bool [B] (samples without a label are skipped).
    """
    per_sample = -(target.float() * F.log_softmax(pred.float(), dim=-1)).sum(dim=-1)
    valid = torch.ones_like(per_sample, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    total = torch.where(valid, per_sample, per_sample.new_zeros(())).sum()
    return total / valid.sum().clamp_min(1)


def bce_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None,
             pos_weight: float | str | None = None) -> Tensor:
    """Binary cross-entropy with logits over valid pixels. pred, target: [B, 1, H, W]; mask [B, H, W].

    `pos_weight` w balances the rare positive class: loss = -(w y log s + (1 - w)(1 - y) log(1 - s)).
    None: plain BCE. A float: fixed weight (0.95 for PASCAL edges, Vandenhende et al.). "auto": w = share of
    negatives among the batch's valid pixels (HED-style class balancing).
    """
    pred = resize_to_target(pred.float(), target.shape[-2:])
    valid = dense_mask(mask, target)
    target = _clean_target(target, valid)
    per_pixel = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=1)
    if pos_weight is not None:
        positive = target.mean(dim=1) > 0.5
        if pos_weight == "auto":
            w = ((~positive) & valid).sum() / valid.sum().clamp_min(1)
        else:
            w = torch.as_tensor(float(pos_weight), device=pred.device)
        per_pixel = per_pixel * torch.where(positive, w, 1.0 - w)
    return _masked_mean(per_pixel, valid)


LossFn = Callable[..., Tensor]

#: loss name (TaskSpec.loss) -> fn(pred, target, mask, **kwargs) -> scalar.
TASK_LOSSES: dict[str, LossFn] = {
    "l1": l1_loss,
    "mse": mse_loss,
    "cosine": cosine_loss,
    "ce": cross_entropy_loss,
    "soft_ce": soft_cross_entropy_loss,
    "bce": bce_loss,
}


def task_loss(spec: TaskSpec, pred: Tensor, target: Tensor, mask: Tensor | None = None,
              loss: str | None = None, **kwargs) -> Tensor:
    """The loss of one task for a batch, dispatched on `loss` (default: the task's own `spec.loss`).

    `loss` is how a config swaps a task's loss (`train.task_losses`, e.g. the official Mod-Squad recipe's MSE
    for principal_curvature and the class tasks).

    Edge tasks (kind "edge") default to the class-balanced BCE of the PASCAL multi-task literature
    (`pos_weight=EDGE_POS_WEIGHT`); pass `pos_weight=None` for plain BCE.
    """
    name = loss or spec.loss
    try:
        fn = TASK_LOSSES[name]
    except KeyError:
        raise UnknownNameError(f"task {spec.name!r}: unknown loss {name!r}; "
                               f"known losses: {', '.join(sorted(TASK_LOSSES))}") from None
    if spec.kind == "edge" and fn is bce_loss:
        kwargs.setdefault("pos_weight", EDGE_POS_WEIGHT)
    return fn(pred, target, mask, **kwargs)
