"""Colour images of predictions and targets for reports, `modsquad predict` and the demo.

`colorize(spec, x)` turns one sample's head output or target into uint8 RGB [H, W, 3]: depth and other
1-channel maps through the task's colormap over a robust (2-98 percentile) range, normals as (n + 1) / 2, labels
through the task's palette (VOC colours; Taskonomy's "background" id drawn black), saliency/edges as grey
probabilities, classification as a bar chart of the top-5 classes. `make_grid` puts input | prediction | target
side by side under column headers, one row per task, upscaled so that small inputs stay readable.
`prediction_panel` is what `modsquad predict` writes: input | prediction with a colour bar and units, a legend of
the classes present, or a note on the encoding. `output_meaning(spec)` says what a task's raw output is (units,
value range, class names); extracted models carry it in config.json and ONNX metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from .registry import IGNORE_INDEX, TaskSpec, get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH_CMAP = "turbo"
ROBUST_PERCENTILES = (2.0, 98.0)
LABEL_HEIGHT = 20
#: make_grid upscales (nearest, integer factor) tiles smaller than this many pixels on their short side.
MIN_TILE = 128

#: Class names per segmentation task (index = class id). Taskonomy ids: 0 uncertain, 1 background, 2-17 the 16
#: indoor COCO classes (data/README.md); PASCAL-Context semseg: background + the 20 VOC classes; human_parts: the
#: six part groups of the PASCAL-MT benchmark.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "segment_semantic": ("uncertain", "background", "chair", "couch", "potted plant", "bed", "dining table",
                         "toilet", "tv", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
                         "vase", "teddy bear"),
    "semseg": ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
               "tv/monitor"),
    "human_parts": ("background", "head", "torso", "upper arms", "lower arms", "upper legs", "lower legs"),
}

#: What a task's head outputs, beyond its kind: units, the range its targets live in, a colour map.
_MEANING: dict[str, dict] = {
    "depth_euclidean": {"quantity": "distance from the camera centre", "units": "m", "value_range": [0.0, 128.0],
                        "cmap": "turbo"},
    "depth_zbuffer": {"quantity": "depth along the optical axis", "units": "m", "value_range": [0.0, 128.0],
                      "cmap": "turbo"},
    "principal_curvature": {"quantity": "principal curvatures k1, k2 (Taskonomy scale)", "units": "",
                            "value_range": [-1.0, 1.0]},
    "reshading": {"quantity": "shading from a fixed light", "units": "", "value_range": [0.0, 1.0], "cmap": "gray"},
    "edge_occlusion": {"quantity": "occlusion edge strength", "units": "", "value_range": [0.0, 1.0],
                       "cmap": "gray", "fixed_range": True},
    "edge_texture": {"quantity": "texture edge strength", "units": "", "value_range": [0.0, 1.0], "cmap": "gray",
                     "fixed_range": True},
    "keypoints2d": {"quantity": "2-D keypoint heat", "units": "", "value_range": [0.0, 1.0], "cmap": "magma"},
    "keypoints3d": {"quantity": "3-D keypoint heat", "units": "", "value_range": [0.0, 1.0], "cmap": "magma"},
    "segment_unsup2d": {"quantity": "unsupervised 2-D segment embedding", "units": "", "value_range": [0.0, 1.0],
                        "cmap": "viridis"},
    "segment_unsup25d": {"quantity": "unsupervised 2.5-D segment embedding", "units": "",
                         "value_range": [0.0, 1.0], "cmap": "viridis"},
    "segment_semantic": {"quantity": "class logits; class id = 1 + argmax over channels 1.. (0 = uncertain is never "
                                     "a label)", "units": "", "value_range": None},
}
_KIND_MEANING = {
    "regression": {"quantity": "value", "units": "", "value_range": None},
    "normal": {"quantity": "surface normal (x, y, z), camera frame; normalise to unit length", "units": "",
               "value_range": [-1.0, 1.0]},
    "segmentation": {"quantity": "class logits; argmax over channels = class id", "units": "", "value_range": None},
    "saliency": {"quantity": "saliency logit; sigmoid = probability", "units": "", "value_range": None},
    "edge": {"quantity": "edge logit; sigmoid = probability", "units": "", "value_range": None},
    "classification": {"quantity": "class logits; softmax = class probabilities", "units": "",
                       "value_range": None},
}


def output_meaning(spec: TaskSpec | str) -> dict:
    """What one task's raw head output means, as plain JSON: {"task", "kind", "channels", "quantity", "units",
    "value_range" (of the training targets, None when unbounded logits), "layout", "class_names" (segmentation)}.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    meaning = {**_KIND_MEANING[spec.kind], **_MEANING.get(spec.name, {})}
    out = {"task": spec.name, "kind": spec.kind, "channels": spec.channels, "quantity": meaning["quantity"],
           "units": meaning["units"], "value_range": meaning["value_range"],
           "layout": "[batch, channels, height, width]" if spec.is_dense else "[batch, classes]"}
    if spec.name in CLASS_NAMES:
        out["class_names"] = list(CLASS_NAMES[spec.name])
    if spec.description:
        out["description"] = spec.description
    return out


def _cmap(spec: TaskSpec) -> str:
    return _MEANING.get(spec.name, {}).get("cmap", DEPTH_CMAP)


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


def colorize_labels(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """labels: int [H, W] (IGNORE_INDEX allowed) -> uint8 [H, W, 3] via `palette` (default the VOC palette)."""
    return (_PALETTE if palette is None else palette)[np.clip(labels.astype(np.int64), 0, 255)]


def task_palette(spec: TaskSpec | str) -> np.ndarray:
    """uint8 [256, 3] label colours of a segmentation task: the VOC palette, except for Taskonomy's
    segment_semantic, whose background (id 1) is drawn black, its 16 classes in VOC colours 1-16 and
    "uncertain" (id 0) in the VOC void colour (so background no longer comes out in "aeroplane" maroon)."""
    name = spec if isinstance(spec, str) else spec.name
    if name != "segment_semantic":
        return _PALETTE
    palette = _PALETTE.copy()
    palette[0], palette[1], palette[2:18] = _PALETTE[255], _PALETTE[0], _PALETTE[1:17]
    return palette


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
        prob = float(np.clip(probs[cls], 0.0, 1.0))
        length = max(int(round(prob * size)), 1 if prob > 0 else 0)  # a diffuse 1000-way guess still shows
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
        labels = spec.class_ids(a) if a.ndim == 3 and a.shape[0] > 1 and np.issubdtype(a.dtype, np.floating) \
            else a.reshape(a.shape[-2:])
        labels = labels.astype(np.int64)
        if valid is not None:
            labels = np.where(valid, labels, IGNORE_INDEX)
        return colorize_labels(labels, task_palette(spec))

    a = a.reshape((-1, *a.shape[-2:])).astype(np.float32)
    if kind in ("saliency", "edge"):
        as_logits = logits if logits is not None else not _is_probability(a)
        p = 1.0 / (1.0 + np.exp(-a[0])) if as_logits else a[0]
        rgb = np.repeat(_to_unit_rgb(p)[..., None], 3, axis=2)
    elif kind == "normal":
        n = a[:3] / np.maximum(np.linalg.norm(a[:3], axis=0, keepdims=True), 1e-6)
        rgb = _to_unit_rgb(((n + 1.0) / 2.0).transpose(1, 2, 0))
    elif a.shape[0] == 1:  # depth and other scalar maps
        return apply_colormap(a[0], valid, cmap=_cmap(spec), value_range=value_range)
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


def _label(text: str, width: int, centre: bool = False) -> np.ndarray:
    """A white strip [LABEL_HEIGHT, width, 3] with `text` in black (left-aligned, or centred)."""
    import cv2

    strip = np.full((LABEL_HEIGHT, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    (tw, _), _ = cv2.getTextSize(text, font, scale, 1)
    x = max((width - tw) // 2, 2) if centre else 3
    cv2.putText(strip, text, (x, LABEL_HEIGHT - 6), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [h, w, 3] by an integer factor (pixels stay crisp)."""
    return img if factor == 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def make_grid(image: Tensor | np.ndarray, preds: Mapping[str, Tensor | np.ndarray],
              targets: Mapping[str, Tensor | np.ndarray] | None = None,
              masks: Mapping[str, Tensor | np.ndarray] | None = None, tasks: Sequence[str] | None = None,
              labels: bool = True, pad: int = 2, min_tile: int = MIN_TILE) -> np.ndarray:
    """One sample as a uint8 [rows, cols, 3] image: per task a row input | prediction | target (the target
    column is left out when `targets` is None). Every tile is resized (nearest) to the input's size, then
    upscaled by the smallest integer factor that makes its short side at least `min_tile` pixels.

    image: [3, H, W]; preds / targets: task -> one sample ([C, H, W], [H, W] labels or [C] classes);
    masks: task -> [H, W]. With `labels`, a header strip names the columns and each row starts with a strip
    naming the task.
    """
    rgb = image_to_uint8(image)
    h, w = rgb.shape[:2]
    factor = max(1, -(-min_tile // max(min(h, w), 1)))
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
        tiles = [_upscale(t, factor) for t in tiles]
        gap = np.full((h * factor, pad, 3), 255, dtype=np.uint8)
        row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        if labels:
            row = np.concatenate([_label(task, row.shape[1]), row], axis=0)
        rows.append(row)
        rows.append(np.full((pad, row.shape[1], 3), 255, dtype=np.uint8))
    if not rows:
        return rgb
    if labels:
        names = ["input", "prediction", *(["target"] if targets else [])]
        header = np.concatenate([t for name in names for t in (_label(name, w * factor, centre=True),
                                                               np.full((LABEL_HEIGHT, pad, 3), 255, np.uint8))][:-1],
                                axis=1)
        rows.insert(0, header)
    return np.concatenate(rows[:-1], axis=0)


def _figure_rgb(fig) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a drawn matplotlib figure (Agg canvas)."""
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def _axis_label(meaning: dict) -> str:
    """Colour bar title: the quantity in at most ~3 short lines, with its units."""
    import textwrap

    units = f" ({meaning['units']})" if meaning["units"] else ""
    return "\n".join(textwrap.wrap(meaning["quantity"] + units, 22)[:3])


def prediction_panel(image: np.ndarray, spec: TaskSpec | str, pred: Tensor | np.ndarray, title: str | None = None,
                     max_side_in: float = 7.0, dpi: int = 100) -> np.ndarray:
    """input | prediction of one image, readable on its own -> uint8 RGB [h, w, 3].

    image: uint8 RGB [H, W, 3]; pred: the head output mapped to the image size ([C, H, W] raw values or
    logits, [H, W] class ids) or, for classification, logits [classes]. Scalar maps get a colour bar with the
    quantity and units (depth in metres), segmentation a legend of the classes present (share of pixels),
    saliency/edges a probability bar, normals and 2-channel maps a note on the colour encoding, classification
    a bar chart of the top-5 classes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch
    from matplotlib.ticker import ScalarFormatter

    spec = get_task(spec) if isinstance(spec, str) else spec
    meaning = output_meaning(spec)
    h, w = image.shape[:2]
    disp_h = 4.0
    disp_w = disp_h * w / max(h, 1)
    if disp_w > max_side_in:  # wide pictures: shrink both to keep the panel a sensible size
        disp_w, disp_h = max_side_in, max_side_in * h / max(w, 1)
    side = 2.4  # inches for the colour bar / legend column
    bottom = 0.6 if spec.kind == "classification" else 0.3  # room for the probability axis
    fig_h = disp_h + 0.6 + bottom
    fig = plt.figure(figsize=(2 * disp_w + side + 0.4, fig_h), dpi=dpi)
    grid = fig.add_gridspec(1, 3, width_ratios=[disp_w, disp_w, side], wspace=0.05, left=0.01, right=0.99,
                            top=1 - 0.55 / fig_h, bottom=bottom / fig_h)
    ax_in, ax_pred, ax_side = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    ax_in.imshow(image)
    ax_in.set_title("input", fontsize=10)
    for ax in (ax_in, ax_pred):
        ax.set_xticks([])
        ax.set_yticks([])
    ax_side.axis("off")
    a = _numpy(pred)
    kind = spec.kind
    if kind == "classification":
        v = a.reshape(-1).astype(np.float64)
        p = np.exp(v - v.max())
        p /= p.sum()
        top = np.argsort(-p)[:5][::-1]
        ax_pred.barh(range(len(top)), p[top], color="#1565c0")
        for row, c in enumerate(top):  # names inside the panel (ticks on the left would cover the input)
            ax_pred.text(0.01, row, f"class {int(c)}: {p[c]:.1%}", va="center", ha="left", fontsize=8,
                         color="black", bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1})
        ax_pred.set_xlim(0, 1)
        ax_pred.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
        ax_pred.tick_params(axis="x", labelsize=7)
        ax_pred.set_xlabel("probability", fontsize=8)
        ax_pred.set_title(f"{spec.name}: top-5 classes", fontsize=10)
    elif kind == "segmentation":
        labels = (spec.class_ids(a) if a.ndim == 3 and a.shape[0] > 1 and np.issubdtype(a.dtype, np.floating)
                  else a.reshape(a.shape[-2:])).astype(np.int64)
        palette = task_palette(spec)
        ax_pred.imshow(colorize_labels(labels, palette), interpolation="nearest")
        ax_pred.set_title(f"{spec.name}", fontsize=10)
        ids, counts = np.unique(labels, return_counts=True)
        order = np.argsort(-counts)[:14]
        names = CLASS_NAMES.get(spec.name, ())
        handles = [Patch(facecolor=palette[min(int(ids[i]), 255)] / 255.0, edgecolor="black", linewidth=0.4,
                         label=f"{names[ids[i]] if ids[i] < len(names) else f'class {ids[i]}'} "
                               f"({counts[i] / labels.size:.0%})") for i in order]
        more = len(ids) - len(order)
        ax_side.legend(handles=handles, loc="center left", fontsize=8, frameon=False,
                       title="classes present" + (f" (+{more} more)" if more > 0 else ""), title_fontsize=8)
    elif kind in ("saliency", "edge"):
        prob = 1.0 / (1.0 + np.exp(-a.reshape((-1, *a.shape[-2:]))[0].astype(np.float64)))
        ax_pred.imshow(prob, cmap="gray", vmin=0.0, vmax=1.0)
        ax_pred.set_title(spec.name, fontsize=10)
        cax = ax_side.inset_axes([0.05, 0.05, 0.1, 0.82])
        fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "gray"), cax=cax)
        cax.set_title("probability", fontsize=8, loc="left")
        cax.tick_params(labelsize=8)
    else:
        a = a.reshape((-1, *a.shape[-2:])).astype(np.float32)
        if a.shape[0] == 1 or spec.name == "reshading":
            values = a[0]
            if meaning["value_range"] is not None:  # e.g. no negative metres (the raw output clips them too)
                values = np.clip(values, *meaning["value_range"])
            lo, hi = (meaning["value_range"] if _MEANING.get(spec.name, {}).get("fixed_range")
                      else robust_range(values))
            if hi - lo < 1e-6 * max(1.0, abs(lo)):  # a (nearly) constant map: a readable bar around its value
                pad = 1e-3 * max(1.0, abs(lo))
                lo, hi = lo - pad, hi + pad
            cmap = _cmap(spec)
            ax_pred.imshow(values, cmap=cmap, vmin=lo, vmax=hi)
            ax_pred.set_title(spec.name, fontsize=10)
            cax = ax_side.inset_axes([0.05, 0.05, 0.1, 0.82])
            fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap), cax=cax)
            cax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # no "1e-7 + 1.3" over the title
            cax.set_title(_axis_label(meaning), fontsize=8, loc="left")
            cax.tick_params(labelsize=8)
        else:
            ax_pred.imshow(colorize(spec, a))
            ax_pred.set_title(spec.name, fontsize=10)
            note = ("colour = (n + 1) / 2:\nR = x, G = y, B = z\n(unit normal,\ncamera frame)" if kind == "normal"
                    else "colour = (v + 1) / 2:\n" + "\n".join(f"{c} = channel {i}" for i, c in
                                                             enumerate("RGB"[:a.shape[0]])))
            ax_side.text(0.05, 0.5, note, fontsize=8, va="center", ha="left", transform=ax_side.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    rgb = _figure_rgb(fig)
    plt.close(fig)
    return rgb


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
