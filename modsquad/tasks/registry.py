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

from ..core.errors import UnknownNameError

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
    #: segmentation: labels below it are never targets (not predicted, not in the mIoU)
    first_label: int = 0

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

    def class_ids(self, logits, dim: int = 0):
        """Segmentation logits (numpy array or tensor) -> class ids (`class_ids`, from `first_label` up)."""
        return class_ids(logits, self.first_label, dim)


def class_ids(logits, first_label: int = 0, dim: int = 0):
    """Segmentation logits (numpy array or tensor) -> class ids: the arg-max over channel `dim` among the channels
    a target can hold (`first_label` and up)."""
    index = [slice(None)] * logits.ndim
    index[dim] = slice(first_label, None)
    return logits[tuple(index)].argmax(dim) + first_label


# --- Taskonomy file codecs ------------------------------------------------------------------------------
# Each decode takes the array as read from disk (H, W[, C], uint8/uint16, or a 1-D .npy vector) and returns
# (target, valid). Each encode is its inverse on valid values, producing what would be written to disk.
# Encodings follow the Taskonomy data README and the official loaders (StanfordVL/taskonomy, EPFL-VILAB/omnidata
# task configs); data/README.md lists each one with its source.

DEPTH_UNITS_PER_METRE = 512.0
DEPTH_INVALID = 65535
#: Depth values from here up mean "no mesh" (holes, sky); the official loaders mask those pixels for depth, normal,
#: principal_curvature, reshading and edge_occlusion (65535 is the usual value, 64500-65534 occur at mesh holes).
DEPTH_NO_MESH = 64500
#: 8-bit value of zero for signed maps (normal, principal_curvature): v = (x - 127) / 127.
SIGNED8_ZERO = 127.0


def _channels_first(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _all_valid(a: np.ndarray) -> np.ndarray:
    return np.ones(a.shape[:2], dtype=bool)


def _first_channel(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 else a


def depth_has_mesh(a: np.ndarray) -> np.ndarray:
    """Raw 16-bit depth [H, W] (or [H, W, C]) -> bool [H, W]: True where the pixel sees the mesh (< 64500)."""
    return _first_channel(a) < DEPTH_NO_MESH


def decode_mask_valid(a: np.ndarray) -> np.ndarray:
    """The `mask_valid` domain (8- or 16-bit PNG, 0 = invalid) -> bool [H, W]."""
    return _first_channel(a) > 0


def decode_depth(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit depth in 1/512 m; values >= 64500 (65535 and the no-mesh range) are masked out."""
    a = _first_channel(a)
    valid = depth_has_mesh(a)
    metres = a.astype(np.float32) / DEPTH_UNITS_PER_METRE
    metres[~valid] = 0.0
    return metres[None], valid


def encode_depth(metres: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """metres: [1, H, W] (as decode returns it) or [H, W]; valid: [H, W] -> uint16 [H, W] (invalid 65535)."""
    metres = metres[0] if metres.ndim == 3 else metres
    out = np.clip(np.round(metres * DEPTH_UNITS_PER_METRE), 0, DEPTH_NO_MESH - 1).astype(np.uint16)
    if valid is not None:
        out[~valid] = DEPTH_INVALID
    return out


def _signed8(a: np.ndarray, channels: int) -> np.ndarray:
    """8-bit [H, W] or [H, W, C] -> float [channels, H, W] = (x - 127) / 127, clipped to [-1, 1]."""
    a = a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)
    v = (a[..., :channels].astype(np.float32) - SIGNED8_ZERO) / SIGNED8_ZERO
    return _channels_first(np.clip(v, -1.0, 1.0))


def _signed8_encoder(channels: int, invalid: int = 127) -> Encode:
    def encode(v: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """v: [channels, H, W] in [-1, 1] -> uint8 [H, W, 3], 127 = zero (unused channels 127); pixels outside
        `valid` [H, W] are written as `invalid` in every channel."""
        h, w = v.shape[1:]
        out = np.full((h, w, 3), 127, dtype=np.uint8)
        lo = 1 if invalid == 0 else 0  # keep valid values off the "no geometry" code
        out[..., :channels] = np.clip(np.round(v.transpose(1, 2, 0) * 127.0 + 127.0), lo, 254).astype(np.uint8)
        if valid is not None:
            out[~valid] = invalid
        return out

    return encode


def decode_normal(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit RGB normals, 127 = zero; pixels that decode to a near-zero vector (the grey 128 that marks
    invalid normals) are masked."""
    v = _signed8(a, 3)
    norm = np.linalg.norm(v, axis=0)
    valid = norm > 0.5
    v = v / np.maximum(norm, 1e-6)[None]
    return v.astype(np.float32), valid


def decode_curvature(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit principal curvatures in channels 0 and 1 (127 = zero; channel 2 unused); a pixel whose two
    curvature channels are both 0 has no geometry and is masked (it would decode to (-1, -1))."""
    rgb = a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)
    valid = (rgb[..., 0] != 0) | (rgb[..., 1] != 0)
    v = _signed8(rgb, 2)
    v[:, ~valid] = 0.0
    return v, valid


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
    a = _first_channel(a)
    return (a.astype(np.float32) / 65535.0)[None], _all_valid(a)


def encode_unit16(v: np.ndarray) -> np.ndarray:
    return np.clip(np.round(v[0] * 65535.0), 0, 65535).astype(np.uint16)


def decode_semantic(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit ids: 0 = uncertain (ignored), 1 = background, 2..17 = COCO classes."""
    labels = _first_channel(a).astype(np.int64)
    valid = (labels > 0) & (labels < 18)
    labels[~valid] = IGNORE_INDEX
    return labels, valid


def encode_semantic(labels: np.ndarray) -> np.ndarray:
    return np.where(labels == IGNORE_INDEX, 0, labels).astype(np.uint8)


def _is_distribution(v: np.ndarray, tol: float = 1e-3) -> bool:
    return bool((v >= 0).all()) and abs(float(v.sum(dtype=np.float64)) - 1.0) < tol


def class_vector_problem(task: str, a: np.ndarray) -> str | None:
    """Why a stored class vector is neither what its task stores nor usable (None when it is fine).

    class_object holds logits (any finite reals; a distribution, e.g. of the synthetic suite, is accepted too);
    class_scene holds non-negative scores with a positive sum. Non-negative class_object scores that do not sum
    to 1 are neither: softmax would flatten them and renormalising is not what the dataset means.
    """
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        return "has non-finite values"
    if task == "class_scene":
        if (v < 0).any():
            return f"has negative entries (min {v.min():.3g}): neither a distribution nor non-negative scores"
        if v.sum() <= 0:
            return "sums to 0: not a distribution"
        return None
    if (v >= 0).all() and not _is_distribution(v):
        return (f"is non-negative with sum {v.sum():.4g}: neither logits (expected signed values) nor a "
                f"distribution (sum 1)")
    return None


def decode_class_object(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """class_object .npy: 1000 logits -> softmax (as the official loader); a stored distribution is kept.
    Non-finite vectors give a uniform target and a False mask."""
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        return np.full(len(v), 1.0 / max(len(v), 1), np.float32), np.zeros((), dtype=bool)
    if not _is_distribution(v):
        v = np.exp(v - v.max())
    return (v / v.sum()).astype(np.float32), np.ones((), dtype=bool)


def decode_class_scene(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """class_scene .npy: 365 non-negative scores renormalised by their sum; vectors with negative or non-finite
    entries or a zero sum give a uniform target and a False mask (`data check` lists them)."""
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if class_vector_problem("class_scene", v) is not None:
        return np.full(len(v), 1.0 / max(len(v), 1), np.float32), np.zeros((), dtype=bool)
    return (v / v.sum()).astype(np.float32), np.ones((), dtype=bool)


def encode_class_object(p: np.ndarray) -> np.ndarray:
    """A distribution [1000] -> logits (log p, floored at 1e-12) that `decode_class_object` maps back to p."""
    return np.log(np.maximum(np.asarray(p, dtype=np.float64), 1e-12)).astype(np.float32)


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

register_task(TaskSpec("normal", 3, "normal", "cosine", _NORMAL, decode_normal, _signed8_encoder(3, 128),
                       description="surface normal in camera frame"))
register_task(TaskSpec("principal_curvature", 2, "regression", "l1", _REG, decode_curvature,
                       _signed8_encoder(2, 0), description="two principal curvatures, 127 = zero, 0 = no geometry"))
register_task(TaskSpec("reshading", 3, "regression", "l1", _REG, _unit8_decoder(3), _unit8_encoder,
                       description="shading from a fixed light, grey in 3 channels"))
for _name, _desc in [("edge_occlusion", "depth discontinuities"), ("edge_texture", "image gradients (Canny-like)"),
                     ("keypoints2d", "2-D interest point heatmap"), ("keypoints3d", "3-D interest point heatmap")]:
    register_task(TaskSpec(_name, 1, "regression", "l1", _REG, decode_unit16, encode_unit16, description=_desc))
for _name in ("segment_unsup2d", "segment_unsup25d"):
    register_task(TaskSpec(_name, 1, "regression", "l1", _REG, _unit8_decoder(1), _unit8_encoder,
                           description="unsupervised segmentation embedding"))
register_task(TaskSpec("segment_semantic", 18, "segmentation", "ce", ("miou", "pixel_acc"), decode_semantic,
                       encode_semantic, description="0 uncertain (ignored), 1 background, 2-17 COCO classes",
                       first_label=1))
register_task(TaskSpec("class_object", 1000, "classification", "soft_ce", _CLS, decode_class_object,
                       encode_class_object, file_ext="npy", description="ImageNet-1k soft labels (stored as logits)"))
register_task(TaskSpec("class_scene", 365, "classification", "soft_ce", _CLS, decode_class_scene, encode_class,
                       file_ext="npy", description="Places-365 soft labels (renormalised by their sum)"))

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
