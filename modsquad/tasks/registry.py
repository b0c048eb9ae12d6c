"""The task registry: one `TaskSpec` per task of every suite modsquad knows.

A spec says what the model must output (`channels`, `kind`), which loss and metrics apply, which metric
summarises the task (`primary`, used by delta_m) and, for Taskonomy-format files, how a stored array is
decoded to a float target and a validity mask (`decode`) and encoded back (`encode`, used by the synthetic
suite so that the same loader reads both).

Kinds and their target layouts (what the data loaders yield per sample):
    regression      float [C, H, W], mask [H, W]                 loss l1     metrics l1, rmse
    normal          float [3, H, W] unit vectors, mask [H, W]     loss cosine metrics angle errors
    segmentation    long  [H, W], IGNORE_INDEX where unlabelled   loss ce     metrics miou, pixel_acc
    saliency        float [1, H, W] in {0, 1}, mask [H, W]        loss bce    metrics maxf, miou
    edge            float [1, H, W] in {0, 1}, mask [H, W]        loss bce    metrics odsf
    classification  float [C] soft labels (sum 1)                 loss soft_ce metrics top1, top5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UnknownNameError

IGNORE_INDEX = 255
KINDS = ("regression", "normal", "segmentation", "saliency", "edge", "classification")
LOWER_IS_BETTER = {"l1", "rmse", "mean_angle", "median_angle", "loss"}

Decode = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]
Encode = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
    """Everything the model, trainer, metrics and loaders need to know about one task."""

    name: str
    channels: int
    kind: str
    loss: str
    metrics: tuple[str, ...]
    decode: Decode | None = None
    encode: Encode | None = None
    primary: str = ""
    suite: str = "taskonomy"
    file_ext: str = "png"
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.primary:
            object.__setattr__(self, "primary", self.metrics[0])

    @property
    def is_dense(self) -> bool:
        """True when the task predicts a map [C, H, W]; False for image-level classification."""
        return self.kind != "classification"

    def lower_is_better(self, metric: str | None = None) -> bool:
        return (metric or self.primary) in LOWER_IS_BETTER


# --- Taskonomy file codecs ------------------------------------------------------------------------------
# Each decode takes the array as read from disk (H, W[, C], uint8/uint16, or a 1-D .npy vector) and returns
# (target, valid). Each encode is its inverse on valid values, producing what would be written to disk.

DEPTH_UNITS_PER_METRE = 512.0
DEPTH_INVALID = 65535


def _channels_first(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _all_valid(a: np.ndarray) -> np.ndarray:
    return np.ones(a.shape[:2], dtype=bool)


def decode_depth(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit depth in 1/512 m; 65535 marks pixels without depth (sky, holes), masked out."""
    a = a[..., 0] if a.ndim == 3 else a
    valid = a != DEPTH_INVALID
    metres = a.astype(np.float32) / DEPTH_UNITS_PER_METRE
    metres[~valid] = 0.0
    return metres[None], valid


def encode_depth(metres: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """metres: [1, H, W] (as decode returns it) or [H, W]; valid: [H, W] -> uint16 [H, W]."""
    metres = metres[0] if metres.ndim == 3 else metres
    out = np.clip(np.round(metres * DEPTH_UNITS_PER_METRE), 0, DEPTH_INVALID - 1).astype(np.uint16)
    if valid is not None:
        out[~valid] = DEPTH_INVALID
    return out


def _signed8_decoder(channels: int) -> Decode:
    def decode(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)
        v = (a[..., :channels].astype(np.float32) - 127.0) / 127.0
        return _channels_first(np.clip(v, -1.0, 1.0)), _all_valid(a)

    return decode


def _signed8_encoder(channels: int) -> Encode:
    def encode(v: np.ndarray) -> np.ndarray:
        """v: [channels, H, W] in [-1, 1] -> uint8 [H, W, 3] with 127 = zero (unused channels 127)."""
        h, w = v.shape[1:]
        out = np.full((h, w, 3), 127, dtype=np.uint8)
        out[..., :channels] = np.clip(np.round(v.transpose(1, 2, 0) * 127.0 + 127.0), 0, 254).astype(np.uint8)
        return out

    return encode


def decode_normal(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit RGB normals, 127 = zero; pixels that decode to a near-zero vector are invalid."""
    v, _ = _signed8_decoder(3)(a)
    norm = np.linalg.norm(v, axis=0)
    valid = norm > 0.5
    v = v / np.maximum(norm, 1e-6)[None]
    return v.astype(np.float32), valid


def _unit8_decoder(channels: int) -> Decode:
    def decode(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if a.ndim == 2:
            a = np.repeat(a[..., None], channels, axis=2)
        return _channels_first(a[..., :channels].astype(np.float32) / 255.0), _all_valid(a)

    return decode


def _unit8_encoder(v: np.ndarray) -> np.ndarray:
    """v: [C, H, W] in [0, 1] -> uint8 [H, W] (C == 1) or [H, W, 3]."""
    q = np.clip(np.round(v * 255.0), 0, 255).astype(np.uint8)
    return q[0] if q.shape[0] == 1 else q.transpose(1, 2, 0)


def decode_unit16(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit maps (edges, keypoints) scaled to [0, 1]."""
    a = a[..., 0] if a.ndim == 3 else a
    return (a.astype(np.float32) / 65535.0)[None], _all_valid(a)


def encode_unit16(v: np.ndarray) -> np.ndarray:
    return np.clip(np.round(v[0] * 65535.0), 0, 65535).astype(np.uint16)


def decode_semantic(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit ids: 0 = uncertain (ignored), 1 = background, 2..17 = COCO classes."""
    a = a[..., 0] if a.ndim == 3 else a
    labels = a.astype(np.int64)
    valid = (labels > 0) & (labels < 18)
    labels[~valid] = IGNORE_INDEX
    return labels, valid


def encode_semantic(labels: np.ndarray) -> np.ndarray:
    return np.where(labels == IGNORE_INDEX, 0, labels).astype(np.uint8)


def decode_class(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A .npy vector of class scores or probabilities, normalised to sum 1 (soft label)."""
    v = np.asarray(a, dtype=np.float32).reshape(-1)
    s = float(v.sum())
    if not np.isfinite(s) or s <= 0:
        return np.full_like(v, 1.0 / max(len(v), 1)), np.zeros((), dtype=bool)
    return v / s, np.ones((), dtype=bool)


def encode_class(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


# --- the registry ----------------------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task (or replace one of the same name); returns the spec so it can be used as a one-liner."""
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def list_tasks(suite: str | None = None) -> list[str]:
    return [n for n, s in TASKS.items() if suite is None or s.suite == suite]


_REG = ("l1", "rmse")
_NORMAL = ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30")
_CLS = ("top1", "top5")

for _name, _desc in [("depth_euclidean", "distance from the camera centre, metres"),
                     ("depth_zbuffer", "distance along the optical axis, metres")]:
    register_task(TaskSpec(_name, 1, "regression", "l1", _REG, decode_depth, encode_depth, description=_desc))

register_task(TaskSpec("normal", 3, "normal", "cosine", _NORMAL, decode_normal, _signed8_encoder(3),
                       description="surface normal in camera frame"))
register_task(TaskSpec("principal_curvature", 2, "regression", "l1", _REG, _signed8_decoder(2),
                       _signed8_encoder(2), description="two principal curvatures, 127 = zero"))
register_task(TaskSpec("reshading", 3, "regression", "l1", _REG, _unit8_decoder(3), _unit8_encoder,
                       description="shading from a fixed light, grey in 3 channels"))
for _name, _desc in [("edge_occlusion", "depth discontinuities"), ("edge_texture", "image gradients (Canny-like)"),
                     ("keypoints2d", "2-D interest point heatmap"), ("keypoints3d", "3-D interest point heatmap")]:
    register_task(TaskSpec(_name, 1, "regression", "l1", _REG, decode_unit16, encode_unit16, description=_desc))
for _name in ("segment_unsup2d", "segment_unsup25d"):
    register_task(TaskSpec(_name, 1, "regression", "l1", _REG, _unit8_decoder(1), _unit8_encoder,
                           description="unsupervised segmentation embedding"))
register_task(TaskSpec("segment_semantic", 18, "segmentation", "ce", ("miou", "pixel_acc"), decode_semantic,
                       encode_semantic, description="0 uncertain (ignored), 1 background, 2-17 COCO classes"))
register_task(TaskSpec("class_object", 1000, "classification", "soft_ce", _CLS, decode_class, encode_class,
                       file_ext="npy", description="ImageNet-1k soft labels"))
register_task(TaskSpec("class_scene", 365, "classification", "soft_ce", _CLS, decode_class, encode_class,
                       file_ext="npy", description="Places-365 soft labels"))

#: Mod-Squad's 13 Taskonomy tasks (segment_semantic is an optional extra).
TASKONOMY_TASKS = ("class_object", "class_scene", "depth_euclidean", "depth_zbuffer", "edge_occlusion",
                   "edge_texture", "keypoints2d", "keypoints3d", "normal", "principal_curvature", "reshading",
                   "segment_unsup2d", "segment_unsup25d")

# PASCAL-Context (PASCAL_MT benchmark); decoding lives in data/pascal_context.py (.mat and distilled PNGs).
register_task(TaskSpec("semseg", 21, "segmentation", "ce", ("miou", "pixel_acc"), suite="pascal_context",
                       description="20 VOC classes + background"))
register_task(TaskSpec("human_parts", 7, "segmentation", "ce", ("miou", "pixel_acc"), suite="pascal_context",
                       description="6 person parts + background"))
register_task(TaskSpec("sal", 1, "saliency", "bce", ("maxf", "miou"), primary="miou", suite="pascal_context",
                       description="binary saliency (distilled)"))
register_task(TaskSpec("normals", 3, "normal", "cosine", _NORMAL, suite="pascal_context",
                       description="surface normals (distilled)"))
register_task(TaskSpec("edge", 1, "edge", "bce", ("odsf",), suite="pascal_context",
                       description="object/part boundaries of the Context label map"))

PASCAL_CONTEXT_TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
