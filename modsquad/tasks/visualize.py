"""Colour images of predictions and targets for reports, `modsquad predict` and the demo.

`colorize(spec, x)` turns one sample's head output or target into uint8 RGB [H, W, 3]: depth and other
1-channel maps through a colormap over a robust (2-98 percentile) range, normals as (n + 1) / 2, labels
through the fixed PASCAL VOC palette, saliency/edges as grey probabilities, classification as a bar chart of
the top-5 classes. `make_grid` puts input | prediction | target side by side, one row per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .registry import IGNORE_INDEX, TaskSpec, get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH_CMAP = "turbo"
ROBUST_PERCENTILES = (2.0, 98.0)
LABEL_HEIGHT = 14


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bits of the label id spread over R, G, B): uint8 [num_colors, 3].

    Deterministic and the one PASCAL tools use, so label images look like the benchmark's.
    """
    ids = np.arange(num_colors)
    palette = np.zeros((num_colors, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (shift * 3 + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


_PALETTE = voc_palette()


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """labels: int [H, W] (IGNORE_INDEX allowed) -> uint8 [H, W, 3] via the VOC palette."""
    return _PALETTE[np.clip(labels.astype(np.int64), 0, 255)]


def robust_range(values: np.ndarray, valid: np.ndarray | None = None,
                 percentiles: tuple[float, float] = ROBUST_PERCENTILES) -> tuple[float, float]:
    """(low, high) percentiles of the finite valid values; (0, 1) when there are none."""
    valid = np.isfinite(values) if valid is None else valid & np.isfinite(values)
    if not valid.any():
        return 0.0, 1.0
    lo, hi = np.percentile(values[valid], percentiles)
    return float(lo), float(hi)


def apply_colormap(values: np.ndarray, valid: np.ndarray | None = None, cmap: str = DEPTH_CMAP,
                   value_range: tuple[float, float] | None = None) -> np.ndarray:
    """values: float [H, W] -> uint8 [H, W, 3] over `value_range` (default: robust_range), invalid black."""
    from matplotlib import colormaps

    valid = np.isfinite(values) if valid is None else valid & np.isfinite(values)
    lo, hi = value_range if value_range is not None else robust_range(values, valid)
    scaled = np.clip((values - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    rgb = (colormaps[cmap](np.nan_to_num(scaled))[..., :3] * 255.0 + 0.5).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def _to_unit_rgb(v: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8."""
    return (np.clip(np.nan_to_num(v), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _is_probability(x: np.ndarray) -> bool:
    return x.size > 0 and float(np.nanmin(x)) >= 0.0 and float(np.nanmax(x)) <= 1.0


def class_bars(probs: np.ndarray, size: int = 64, top_k: int = 5) -> np.ndarray:
    """probs: [C] -> uint8 [size, size, 3]: one horizontal bar per top-k class, length = probability.

    Bars are coloured by class id (VOC palette) so the same class keeps its colour across images.
    """
    top = np.argsort(-probs)[:top_k]
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    bar_h = size // max(top_k, 1)
    for row, cls in enumerate(top):
        length = int(round(float(np.clip(probs[cls], 0.0, 1.0)) * size))
        color = _PALETTE[(int(cls) % 255) + 1]
        img[row * bar_h + 1:(row + 1) * bar_h - 1, :length] = color
    return img


def colorize(spec: TaskSpec | str, x: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None,
             logits: bool | None = None, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """One sample's prediction or target -> uint8 RGB [H, W, 3] (classification: a [64, 64, 3] bar chart).

    x: [C, H, W] (a prediction, or a target as the loader yields it), [H, W] labels for segmentation, or [C]
    for classification. `logits` says whether saliency/edge/classification values are logits (sigmoid /
    softmax applied); None guesses: values outside [0, 1] (or not summing to 1) are logits.
    mask: optional bool [H, W] (classification: one bool, [] or [1]); invalid pixels / unlabelled images are
    drawn black. value_range: colormap range of 1-channel
    maps (default: the sample's robust range; pass the target's to compare prediction and target).
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    a = _numpy(x)
    kind = spec.kind

    if kind == "classification":  # the mask is one bool per sample ([] or [1]), not a map
        v = a.reshape(-1).astype(np.float64)
        if mask is not None and not _numpy(mask).astype(bool).all():
            return np.zeros((64, 64, 3), dtype=np.uint8)  # no label for this image: black, like masked pixels
        as_logits = logits if logits is not None else not (_is_probability(v) and abs(v.sum() - 1.0) < 1e-3)
        if as_logits:
            v = np.exp(v - v.max())
            v /= v.sum()
        return class_bars(v)

    valid = None if mask is None else _numpy(mask).astype(bool).reshape(a.shape[-2:])

    if kind == "segmentation":
        labels = a.argmax(axis=0) if a.ndim == 3 and a.shape[0] > 1 and np.issubdtype(a.dtype, np.floating) \
            else a.reshape(a.shape[-2:])
        labels = labels.astype(np.int64)
        if valid is not None:
            labels = np.where(valid, labels, IGNORE_INDEX)
        return colorize_labels(labels)

    a = a.reshape((-1, *a.shape[-2:])).astype(np.float32)
    if kind in ("saliency", "edge"):
        as_logits = logits if logits is not None else not _is_probability(a)
        p = 1.0 / (1.0 + np.exp(-a[0])) if as_logits else a[0]
        rgb = np.repeat(_to_unit_rgb(p)[..., None], 3, axis=2)
    elif kind == "normal":
        n = a[:3] / np.maximum(np.linalg.norm(a[:3], axis=0, keepdims=True), 1e-6)
        rgb = _to_unit_rgb(((n + 1.0) / 2.0).transpose(1, 2, 0))
    elif a.shape[0] == 1:  # depth and other scalar maps
        return apply_colormap(a[0], valid, value_range=value_range)
    else:  # 2-3 channel maps (reshading, curvature): signed values map [-1, 1] -> [0, 1]; missing channel grey
        v = (a[:3] + 1.0) / 2.0 if float(np.nanmin(a)) < 0.0 else a[:3]
        if v.shape[0] < 3:
            v = np.concatenate([v, np.full((3 - v.shape[0], *v.shape[1:]), 0.5, np.float32)])
        rgb = _to_unit_rgb(v.transpose(1, 2, 0))
    if valid is not None:
        rgb[~valid] = 0
    return rgb


def image_to_uint8(image: Tensor | np.ndarray, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> np.ndarray:
    """Model input [3, H, W] -> uint8 [H, W, 3]. Undoes `mean`/`std` normalisation; with neither given,
    values outside [0, 1] are taken as ImageNet-normalised."""
    a = _numpy(image).astype(np.float32)
    if mean is None and std is None and not _is_probability(a):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if mean is not None or std is not None:
        m = np.asarray(mean if mean is not None else (0.0,) * 3, np.float32)[:, None, None]
        s = np.asarray(std if std is not None else (1.0,) * 3, np.float32)[:, None, None]
        a = a * s + m
    return _to_unit_rgb(a.transpose(1, 2, 0))


def _fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of uint8 [h, w, 3] to [height, width, 3] (keeps label colours exact)."""
    if img.shape[:2] == (height, width):
        return img
    rows = (np.arange(height) * img.shape[0] / height).astype(np.int64)
    cols = (np.arange(width) * img.shape[1] / width).astype(np.int64)
    return img[rows][:, cols]


def _label(text: str, width: int) -> np.ndarray:
    """A white strip [LABEL_HEIGHT, width, 3] with `text` in black."""
    import cv2

    strip = np.full((LABEL_HEIGHT, width, 3), 255, dtype=np.uint8)
    cv2.putText(strip, text, (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def make_grid(image: Tensor | np.ndarray, preds: Mapping[str, Tensor | np.ndarray],
              targets: Mapping[str, Tensor | np.ndarray] | None = None,
              masks: Mapping[str, Tensor | np.ndarray] | None = None, tasks: Sequence[str] | None = None,
              labels: bool = True, pad: int = 2) -> np.ndarray:
    """One sample as a uint8 [rows, cols, 3] image: per task a row input | prediction | target (the target
    column is left out when `targets` is None). Every tile is resized (nearest) to the input's size.

    image: [3, H, W]; preds / targets: task -> one sample ([C, H, W], [H, W] labels or [C] classes);
    masks: task -> [H, W]. With `labels`, each row starts with a strip naming the task.
    """
    rgb = image_to_uint8(image)
    h, w = rgb.shape[:2]
    tasks = list(tasks) if tasks is not None else list(preds)
    targets, masks = targets or {}, masks or {}
    rows = []
    for task in tasks:
        mask = masks.get(task)
        vrange = None
        if task in targets and get_task(task).kind == "regression":  # same colour scale for pred and target
            t = _numpy(targets[task]).astype(np.float32)
            if t.ndim == 3 and t.shape[0] == 1:
                vrange = robust_range(t[0], None if mask is None else _numpy(mask).astype(bool).reshape(t.shape[1:]))
        tiles = [rgb, _fit(colorize(task, preds[task], value_range=vrange), h, w)]
        if task in targets:
            tiles.append(_fit(colorize(task, targets[task], mask, logits=False, value_range=vrange), h, w))
        elif targets:
            tiles.append(np.zeros_like(rgb))
        gap = np.full((h, pad, 3), 255, dtype=np.uint8)
        row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        if labels:
            row = np.concatenate([_label(task, row.shape[1]), row], axis=0)
        rows.append(row)
        rows.append(np.full((pad, row.shape[1], 3), 255, dtype=np.uint8))
    if not rows:
        return rgb
    return np.concatenate(rows[:-1], axis=0)


def save_prediction_png(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 [H, W, 3] (or [H, W]) as PNG, creating parent folders; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_prediction_png expects uint8, got {arr.dtype}")
    Image.fromarray(arr).save(path)
    return path


def to_tensor_image(image: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] -> uint8 [3, H, W] (for TensorBoard / torchvision utilities)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
