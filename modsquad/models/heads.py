"""Task heads: turn the encoder's patch tokens of one task into that task's prediction.

Every head has the same call, `head(x, grid_size)` with `x: [B, N, D]` (N = h * w patch tokens, row-major) and
`grid_size = (h, w)`, so the model treats them alike. Dense heads return `[B, C, h * p, w * p]`, the
classification head `[B, C]`. Outputs are logits for segmentation / saliency / edge / classification tasks and
raw values for regression and normals; losses and decoders apply the activation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import ConfigError
from ..tasks import TaskSpec

HEAD_TYPES = ("linear", "conv")


def tokens_to_map(x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """x: [B, h*w, D] -> [B, D, h, w]."""
    h, w = grid_size
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class LinearPatchHead(nn.Module):
    """Mod-Squad's dense head: one Linear per token to its p x p x C pixels, then unpatchify.

    Cheap and exact to the patch grid; with no spatial mixing after the encoder it relies on the tokens alone.
    """

    def __init__(self, dim: int, out_channels: int, patch_size: int):
        super().__init__()
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """x: [B, h*w, D] -> [B, C, h*p, w*p]."""
        h, w = grid_size
        p, c = self.patch_size, self.out_channels
        x = self.proj(x)  # [B, h*w, p*p*C], per token laid out (p_row, p_col, C)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
        return x.reshape(x.shape[0], c, h * p, w * p)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm (not BatchNorm): each head sees only its task's slice of the batch, often a few images."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvHead(nn.Module):
    """Progressive upsampling head (SETR-PUP style): x2 bilinear upsample + conv3x3 + GroupNorm + GELU per stage.

    `log2(patch_size)` stages bring the token grid to full resolution, halving the width each stage (never
    below `min_channels`); a 1x1 conv gives the task's channels. Patch sizes that are not a power of two finish
    with one bilinear resize to `grid * patch_size`.
    """

    def __init__(self, dim: int, out_channels: int, patch_size: int, hidden_dim: int | None = None,
                 min_channels: int = 16, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.patch_size = patch_size
        num_stages = int(math.floor(math.log2(patch_size))) if patch_size > 1 else 0
        in_ch = dim
        ch = hidden_dim or min(dim, 256)
        stages = []
        for _ in range(num_stages):
            stages.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, ch, kernel_size=3, padding=1, bias=False),
                _group_norm(ch),
                act_layer(),
            ))
            in_ch = ch
            ch = max(ch // 2, min_channels)
        self.stages = nn.Sequential(*stages)
        self.pred = nn.Conv2d(in_ch, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """x: [B, h*w, D] -> [B, C, h*p, w*p]."""
        h, w = grid_size
        x = self.stages(tokens_to_map(x, grid_size))
        out_size = (h * self.patch_size, w * self.patch_size)
        if x.shape[-2:] != out_size:
            x = nn.functional.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.pred(x)


class ClassificationHead(nn.Module):
    """Image-level head: mean of the patch tokens, LayerNorm, Linear to class logits."""

    def __init__(self, dim: int, num_classes: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, num_classes]."""
        return self.fc(self.norm(x.mean(dim=1)))


def build_head(spec: TaskSpec, dim: int, patch_size: int, head: str = "linear") -> nn.Module:
    """The head for one task: classification tasks always pool; dense tasks use the `head` type."""
    if head not in HEAD_TYPES:
        raise ConfigError(f"head must be one of {HEAD_TYPES}, got {head!r}")
    if not spec.is_dense:
        return ClassificationHead(dim, spec.channels)
    if head == "conv":
        return ConvHead(dim, spec.channels, patch_size)
    return LinearPatchHead(dim, spec.channels, patch_size)
