"""`modsquad predict`: run an extracted (or full) model on photographs and write predictions people can read.

    result = predict_images("out/extracted/depth_euclidean", ["photos/", "shots/*.jpg"], out="preds", raw=True)
    result.written, result.skipped      # paths written; {input: why it was skipped}

Inputs: image files, folders (their images, not recursive) and glob patterns (`"shots/*.jpg"`, quoted so the
shell leaves them to us). A file that is missing or cannot be decoded is skipped and reported, the rest of the
batch goes on; only when nothing at all could be predicted is that an error.

Aspect ratio is kept: each image is resized so that its short side equals the model's input size (the long side
follows, capped at `MAX_ASPECT` times the short side), normalised as in training (RGB in [0, 1], ImageNet
mean/std, from the model's `pretrained_cfg`), and padded on the bottom and right to a multiple of the patch size
(the model resamples its position embeddings to any such grid). The prediction is cropped back to the resized
image and mapped to the image's own size: bilinear for maps, nearest for segmentation labels (after the argmax).

Outputs per image and task, in `out` (default: next to each input image):
    <stem>_<task>.png        a panel: input | prediction, with a colour bar and units (depth in metres), a legend
                             of the class names present, or a note on the colour encoding (`prediction_panel`)
    <stem>_<task>_raw.<ext>  with `raw`: the prediction itself, at the image's size (`raw_prediction`): depth as a
                             16-bit PNG in the Taskonomy encoding (1/512 m, 65535 = invalid), normals as 8-bit
                             RGB in the Taskonomy encoding (v * 127 + 127), class ids as an 8-bit PNG, saliency and
                             edge probabilities as an 8-bit PNG (x 255), other maps as float32 .npy [C, H, W],
                             classification as float32 .npy class probabilities.
Every file is written atomically, and outputs never overwrite an input image or each other: such a clash is an
error before anything is written. Every PNG written carries a text chunk (`OUTPUT_MARK`), so a second run over
the same folder leaves the first run's predictions out of its inputs and replaces them. 8-bit, 16-bit and float
images (in [0, 1], or in [0, 255]) are read at their own scale; photos are turned as their EXIF orientation says.
"""

from __future__ import annotations

import glob
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .core.atomic import atomic_write, check_dir_path, ensure_dir
from .core.devices import resolve_device
from .core.errors import DataError, OutputPathError, UnknownNameError
from .data.io import read_image
from .extract.extracted import CONFIG_NAME, WEIGHTS_NAME, load_extracted
from .tasks.visualize import IMAGENET_MEAN, IMAGENET_STD, output_meaning, prediction_panel

Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".tif", ".tiff", ".bmp", ".webp", ".gif")
#: A PNG text chunk every PNG that `predict` writes carries, so that a later run over the same folder leaves its
#: predictions out of the inputs (and may replace them) instead of taking them for photographs.
OUTPUT_MARK = b"Software\x00modsquad predict"
_IHDR_END = 33  # PNG signature (8 bytes) + IHDR chunk (length 4, type 4, data 13, CRC 4): where the mark goes
#: The long side of a resized image is at most this many times its short side (panoramas are shrunk further).
MAX_ASPECT = 4.0
#: How inputs are fitted to the model, for --help, the README and the result.
RESIZE_STRATEGY = ("aspect ratio kept: short side resized to the model's input size (long side at most "
                   f"{MAX_ASPECT:g}x it), padded to a multiple of the patch size, prediction cropped and resized "
                   "back to the image's size")


@dataclass
class ModelInput:
    """What a loaded model expects: input size (H, W) it was built for, patch size, normalisation."""

    size: tuple[int, int]
    patch_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class PredictResult:
    """Paths written (image by image, task by task) and the inputs skipped, with the reason for each."""

    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    strategy: str = RESIZE_STRATEGY


def resolve_model_path(model_path: str | os.PathLike) -> Path:
    """An extracted model's folder also when given its `model.safetensors` (or `config.json`) file."""
    path = Path(model_path)
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME) and (path.parent / CONFIG_NAME).is_file():
        return path.parent
    return path


def load_predictor(model_path: str | os.PathLike, tasks: Sequence[str] | None = None, device: str = "auto",
                   compile: bool = False) -> tuple[Predictor, dict, ModelInput, torch.device]:
    """(images -> {task: prediction}, {task: TaskSpec}, ModelInput, device) for an extracted model directory
    (config.json, or its model.safetensors) or a full checkpoint / run directory (all its tasks unless `tasks`
    is given). `compile`: run the model through `torch.compile` (compiled on the first batch)."""
    path = resolve_model_path(model_path)
    dev = resolve_device(device)
    if (path / CONFIG_NAME).is_file():
        extracted = load_extracted(path).to(dev)
        for task in tasks or ():
            if task != extracted.task:
                raise UnknownNameError(f"{path} is the extracted model of {extracted.task!r}; it has no task {task!r}")
        model, specs = extracted.model, {extracted.task: extracted.spec}
        run_extracted = torch.compile(extracted, dynamic=True) if compile else extracted

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {extracted.task: run_extracted(images)}
    else:
        model = load_model(path).to(dev)
        selected = list(tasks) if tasks else list(model.tasks)
        for task in selected:
            model.task_index(task)  # UnknownNameError naming the model's tasks
        specs = {t: model.task_specs[t] for t in selected}
        run_model = torch.compile(model, dynamic=True) if compile else model

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return run_model(images, tasks=selected)
    cfg = model.pretrained_cfg
    spec = ModelInput(size=tuple(cfg["input_size"][1:]), patch_size=int(cfg["patch_size"]),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return predict, specs, spec, dev


def is_prediction(path: Path) -> bool:
    """Whether `path` is a PNG written by `modsquad predict` (it carries `OUTPUT_MARK` right after its header)."""
    if path.suffix.lower() != ".png":
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(_IHDR_END + 8 + len(OUTPUT_MARK))
    except OSError:
        return False
    return head[_IHDR_END + 4:].startswith(b"tEXt" + OUTPUT_MARK)  # after the chunk's length field


def _mark_png(png: bytes) -> bytes:
    """Insert the `OUTPUT_MARK` tEXt chunk (length, type + data, CRC) right after the IHDR chunk of a PNG."""
    chunk = b"tEXt" + OUTPUT_MARK
    mark = len(OUTPUT_MARK).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
    return png[:_IHDR_END] + mark + png[_IHDR_END:]


def _is_input_image(path: Path) -> bool:
    """An image file a folder or pattern contributes: a known suffix, not an earlier prediction."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not is_prediction(path)


def _images_in(folder: Path) -> list[Path]:
    """The image files of a folder, sorted, without earlier predictions of `modsquad predict`."""
    return sorted(f for f in folder.iterdir() if _is_input_image(f))


def expand_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], dict[str, str]]:
    """(image files, {input: why nothing came of it}) of files, folders (their images, sorted, not recursive)
    and glob patterns (`*`, `?`, `[...]`; sorted matches). A file reached twice counts once. PNGs that
    `modsquad predict` wrote are left out of folders and patterns, and skipped when named."""
    files: list[Path] = []
    skipped: dict[str, str] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = _images_in(p)
            if not found:
                skipped[str(p)] = f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
            files.extend(found)
        elif p.is_file():
            if is_prediction(p):
                skipped[str(p)] = "a prediction written by modsquad predict, not a photograph"
            else:
                files.append(p)
        elif glob.has_magic(str(raw)):
            matches = [Path(m) for m in sorted(glob.glob(str(raw)))]
            found = [m for m in matches if _is_input_image(m)]
            for m in matches:
                if m.is_dir():
                    found.extend(_images_in(m))
            if not found:
                skipped[str(raw)] = "no image matches this pattern"
            files.extend(found)
        else:
            skipped[str(p)] = "not found"
    unique = {f.resolve(): f for f in reversed(files)}
    return [f for f in files if unique.get(f.resolve()) is f], skipped


def to_unit_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """float32 RGB [H, W, 3] in [0, 1] from uint8 / uint16 / float images ([H, W] grey or [H, W, 3]).

    Floats already in [0, 1] are kept (a float TIFF), floats in [0, 255] are divided by 255; anything else
    (negative, NaN, HDR values) is a DataError naming the file.
    """
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        x = image.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 255.0:
            raise DataError(f"{name}: float image with values outside [0, 1] and [0, 255] "
                            f"(min {np.nanmin(x):.3g}, max {np.nanmax(x):.3g}); save it as 8-bit or in [0, 1]")
        return x if x.max() <= 1.0 else x / 255.0
    raise DataError(f"{name}: unsupported pixel type {image.dtype}")


def read_images(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """float32 RGB [H, W, 3] in [0, 1] of every file; DataError naming the first that is missing or cannot be
    decoded."""
    images = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"image not found: {p}")
        images.append(to_unit_rgb(read_image(p, orient=True), str(p)))
    return images


def _try_read(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(image in [0, 1], None) or (None, why it cannot be read)."""
    try:
        return to_unit_rgb(read_image(path, orient=True), str(path)), None
    except DataError as e:
        return None, str(e).removeprefix(f"unreadable image {path}: ").removeprefix(f"{path}: ")
    except (OSError, ValueError, cv2.error) as e:
        return None, f"unreadable ({e})"


def _raw_suffix(spec) -> str:
    return ".npy" if spec.kind == "classification" or (
        spec.kind == "regression" and output_meaning(spec)["units"] != "m") else ".png"


def output_paths(images: Sequence[Path], specs: dict, out: str | os.PathLike | None,
                 raw: bool = False) -> list[list[tuple[Path, Path | None]]]:
    """[image][task] -> (`<dir>/<stem>_<task>.png`, `<dir>/<stem>_<task>_raw.<ext>` or None), dir = `out` or the
    image's folder; OutputPathError when one would overwrite an input image or another output (two inputs with
    the same stem in different folders, with one --out). specs: {task: TaskSpec}."""
    inputs = {p.resolve(): p for p in images}
    taken: dict[Path, Path] = {}

    def claim(dst: Path, src: Path) -> Path:
        key = dst.resolve()
        if key in inputs:
            raise OutputPathError(f"the prediction of {src} would overwrite the input image {inputs[key]}; "
                                  f"write predictions elsewhere with --out DIR")
        if key in taken:
            raise OutputPathError(f"{taken[key]} and {src} would both write {dst}; rename one or predict "
                                  f"them into different --out folders")
        taken[key] = src
        return dst

    paths = []
    for src in images:
        folder = Path(out) if out is not None else src.parent
        row = []
        for task, spec in specs.items():
            panel = claim(folder / f"{src.stem}_{task}.png", src)
            raw_path = claim(folder / f"{src.stem}_{task}_raw{_raw_suffix(spec)}", src) if raw else None
            row.append((panel, raw_path))
        paths.append(row)
    return paths


def fit_size(h: int, w: int, model: ModelInput) -> tuple[int, int, int, int]:
    """(resized h, resized w, padded h, padded w) of an h x w image: short side = the model's (smaller) input
    side, aspect ratio kept, long side at most MAX_ASPECT x the short side, padded up to multiples of the patch."""
    short = min(model.size)
    scale = short / min(h, w)
    if max(h, w) * scale > MAX_ASPECT * short:
        scale = MAX_ASPECT * short / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    p = model.patch_size
    return nh, nw, math.ceil(nh / p) * p, math.ceil(nw / p) * p


def preprocess(image: np.ndarray, model: ModelInput | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB [H, W, 3] (uint8, uint16 or float, see `to_unit_rgb`) -> (float [3, ph, pw] normalised with the model's
    mean/std, the resized image's (h, w) inside it). Aspect ratio kept (`fit_size`); the padding (bottom, right)
    is 0 after normalisation, i.e. the mean colour. A bare (H, W) means patch 16 and ImageNet statistics."""
    model = model if isinstance(model, ModelInput) else ModelInput(tuple(model), 16)
    image = to_unit_rgb(image)
    nh, nw, ph, pw = fit_size(*image.shape[:2], model)
    interp = cv2.INTER_AREA if image.shape[0] > nh and image.shape[1] > nw else cv2.INTER_LINEAR
    x = cv2.resize(image, (nw, nh), interpolation=interp).astype(np.float32)
    if x.ndim == 2:
        x = x[..., None]
    x = (x - np.asarray(model.mean, np.float32)) / np.asarray(model.std, np.float32)
    padded = np.zeros((ph, pw, 3), np.float32)
    padded[:nh, :nw] = x
    return torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))), (nh, nw)


def to_image_size(spec, pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One sample's cropped head output [C, h, w] -> [C, H, W] (bilinear) or, for segmentation, class ids
    [H, W] (argmax, then nearest); classification [classes] is returned as is."""
    if not spec.is_dense:
        return pred
    if spec.kind == "segmentation":
        labels = spec.class_ids(pred)[None, None].float()
        return F.interpolate(labels, size=size, mode="nearest-exact")[0, 0].long()
    return F.interpolate(pred[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def render(spec, pred: torch.Tensor, size: tuple[int, int], image: np.ndarray | None = None,
           title: str | None = None) -> np.ndarray:
    """One sample's head output ([C, h, w] or [classes]) -> the uint8 RGB panel of `prediction_panel` (input |
    prediction at the original image size (H, W); a grey input when `image` is None)."""
    if image is None:
        image = np.full((*size, 3), 128, np.uint8)
    return prediction_panel(image, spec, to_image_size(spec, pred, size), title=title)


def raw_prediction(spec, pred: torch.Tensor) -> np.ndarray:
    """The prediction at image size (from `to_image_size`) in the encoding written by `--raw` (see the module
    docstring): uint16 / uint8 arrays for PNG, float32 for .npy."""
    a = pred.detach().float().cpu().numpy() if pred.is_floating_point() else pred.cpu().numpy()
    if spec.kind == "classification":
        p = np.exp(a - a.max())
        return (p / p.sum()).astype(np.float32)
    if spec.kind == "segmentation":
        return np.clip(a, 0, 255).astype(np.uint8)
    if spec.kind in ("saliency", "edge"):
        return np.round(255.0 / (1.0 + np.exp(-a[0]))).astype(np.uint8)
    if spec.kind == "normal":
        n = a[:3] / np.maximum(np.linalg.norm(a[:3], axis=0, keepdims=True), 1e-6)
        if spec.encode is not None:
            return spec.encode(n)
        return np.round((n.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)
    if output_meaning(spec)["units"] == "m" and spec.encode is not None:
        return spec.encode(np.maximum(a, 0.0))
    return a.astype(np.float32)


def _write(path: Path, array: np.ndarray, rgb: bool = True) -> Path:
    """Write a PNG (uint8 RGB [H, W, 3], or a grey uint8 / uint16 [H, W]) or an .npy, atomically."""
    if path.suffix == ".npy":
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to the temporary name
                np.save(fh, array, allow_pickle=False)

        return atomic_write(path, save)
    a = np.ascontiguousarray(array)
    if a.ndim == 3 and rgb:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise DataError(f"cannot encode a PNG for {path}")
    png = _mark_png(buf.tobytes())
    return atomic_write(path, lambda tmp: tmp.write_bytes(png))


@torch.no_grad()
def predict_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike],
                   out: str | os.PathLike | None = None, tasks: Sequence[str] | None = None,
                   device: str = "auto", batch_size: int = 8, compile: bool = False,
                   raw: bool = False) -> PredictResult:
    """Predict every image with the model at `model_path` and write a panel (and with `raw` the raw prediction)
    per image and task; see the module docstring for inputs, resizing and outputs.

    `model_path`: an extracted model directory (or its model.safetensors), or a full checkpoint / run directory
    (with `tasks`, default all). Returns a `PredictResult`; inputs that are missing or cannot be decoded are
    skipped and listed there. DataError when nothing could be predicted; OutputPathError, before anything is
    written, when an output would overwrite an input image or another output.
    """
    if not images:
        raise DataError("no images given")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if out is not None:
        check_dir_path(out, "--out")
    predict, specs, model_input, dev = load_predictor(model_path, tasks, device, compile=compile)
    files, skipped = expand_inputs(images)
    targets = output_paths(files, specs, out, raw=raw)
    result = PredictResult(skipped=skipped)
    for start in range(0, len(files), batch_size):
        chunk = []  # (index, file, image in [0, 1])
        for i, f in enumerate(files[start:start + batch_size], start):
            image, why = _try_read(f)
            if image is None:
                result.skipped[str(f)] = why
            else:
                chunk.append((i, f, image))
        groups: dict[tuple[int, int], list] = {}  # same padded shape -> one forward
        for item in chunk:
            x, inner = preprocess(item[2], model_input)
            groups.setdefault(tuple(x.shape[1:]), []).append((item, x, inner))
        done = {}
        for members in groups.values():
            preds = predict(torch.stack([x for _, x, _ in members]).to(dev))
            for j, ((i, f, image), _, (nh, nw)) in enumerate(members):
                done[i] = (f, image, {t: p[j, ..., :nh, :nw] if specs[t].is_dense else p[j]
                                      for t, p in preds.items()})
        if done and out is not None:  # only once something will be written into it
            ensure_dir(out, "--out")
        for i in sorted(done):
            f, image, sample = done[i]
            rgb8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            for (panel_path, raw_path), (task, spec) in zip(targets[i], specs.items(), strict=True):
                pred = to_image_size(spec, sample[task].float().cpu(), image.shape[:2])
                panel = prediction_panel(rgb8, spec, pred, title=f"{f.name}: {task}")
                result.written.append(_write(panel_path, panel))
                if raw_path is not None:
                    result.written.append(_write(raw_path, raw_prediction(spec, pred)))
    if not result.written:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(result.skipped.items())[:3])
        more = f" (+{len(result.skipped) - 3} more)" if len(result.skipped) > 3 else ""
        raise DataError(f"nothing could be predicted: {reasons}{more}")
    return result
