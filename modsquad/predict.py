"""`modsquad predict`: run an extracted (or full) model on image files and write colourised predictions.

    paths = predict_images("out/extracted/depth_euclidean", ["a.jpg", "b.png"], out="preds")

Images of any size are resized to the model's input size, normalised with the ImageNet mean/std (as in
training), predicted, and the prediction is mapped back to the image's own size: bilinear for maps, nearest for
segmentation labels (after the argmax). Each prediction is written as `<out>/<stem>_<task>.png` (next to the
input image when no `out` is given) with `modsquad.tasks.visualize.colorize`: a colour map for depth and other
scalar maps, normals as RGB, the VOC palette for labels, grey probabilities for saliency and edges, a top-5 bar
chart for classification. Every image is read before anything is written, and every PNG is written atomically.
Outputs never overwrite an input image or each other: such a clash is an error before anything is written.
8-bit, 16-bit and float images (float in [0, 1], or in [0, 255]) are all read at their own scale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, OutputPathError, UnknownNameError
from .tasks.visualize import IMAGENET_MEAN, IMAGENET_STD, colorize

Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_predictor(model_path: str | os.PathLike, tasks: Sequence[str] | None = None, device: str = "auto",
                   compile: bool = False) -> tuple[Predictor, dict, tuple[int, int], torch.device]:
    """(images -> {task: prediction}, {task: TaskSpec}, input size (H, W), device) for an extracted model
    directory (config.json) or a full checkpoint / run directory (all its tasks unless `tasks` is given).
    `compile`: run the model through `torch.compile` (compiled on the first batch)."""
    from .engine.checkpoint import load_model
    from .engine.distributed import resolve_device
    from .extract.standalone import CONFIG_NAME, load_extracted

    path = Path(model_path)
    dev = resolve_device(device)
    if (path / CONFIG_NAME).is_file():
        sub = load_extracted(path).to(dev)
        for task in tasks or ():
            if task != sub.task:
                raise UnknownNameError(f"{path} is the extracted model of {sub.task!r}; it has no task {task!r}")
        model, specs, size = sub.model, {sub.task: sub.spec}, sub.img_size
        run_sub = torch.compile(sub) if compile else sub

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {sub.task: run_sub(images)}
    else:
        model = load_model(path).to(dev)
        selected = list(tasks) if tasks else list(model.tasks)
        for task in selected:
            model.task_index(task)  # UnknownNameError naming the model's tasks
        specs, size = {t: model.task_specs[t] for t in selected}, model.config["img_size"]
        run_model = torch.compile(model) if compile else model

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return run_model(images, tasks=selected)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return predict, specs, size, dev


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of `paths`: files as given, folders expanded to their images (sorted, not recursive);
    a path given twice counts once. DataError for a missing path or a folder without images."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image not found: {p}")
    unique = {f.resolve(): f for f in reversed(files)}
    return [f for f in files if unique.get(f.resolve()) is f]


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
    from .data.io import read_image

    images = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"image not found: {p}")
        images.append(to_unit_rgb(read_image(p), str(p)))
    return images


def output_paths(images: Sequence[Path], tasks: Sequence[str], out: str | os.PathLike | None) -> list[list[Path]]:
    """[image][task] -> `<out or the image's folder>/<stem>_<task>.png`; OutputPathError when one would overwrite
    an input image or another output (two inputs with the same stem in different folders, with one --out)."""
    inputs = {p.resolve(): p for p in images}
    taken: dict[Path, Path] = {}
    paths = []
    for src in images:
        folder = Path(out) if out is not None else src.parent
        row = []
        for task in tasks:
            dst = folder / f"{src.stem}_{task}.png"
            key = dst.resolve()
            if key in inputs:
                raise OutputPathError(f"the prediction of {src} would overwrite the input image {inputs[key]}; "
                                      f"write predictions elsewhere with --out DIR")
            if key in taken:
                raise OutputPathError(f"{taken[key]} and {src} would both write {dst}; rename one or predict "
                                      f"them into different --out folders")
            taken[key] = src
            row.append(dst)
        paths.append(row)
    return paths


def preprocess(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """RGB [H, W, 3] (uint8, uint16 or float, see `to_unit_rgb`) -> float [3, h, w] at the model's size,
    ImageNet-normalised (as eval transforms do)."""
    h, w = size
    image = to_unit_rgb(image)
    interp = cv2.INTER_AREA if image.shape[0] > h and image.shape[1] > w else cv2.INTER_LINEAR
    x = cv2.resize(image, (w, h), interpolation=interp).astype(np.float32)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def render(spec, pred: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One sample's head output ([C, h, w] or [classes]) -> uint8 RGB at the original image size (H, W)."""
    if not spec.is_dense:
        return colorize(spec, pred, logits=True)
    if spec.kind == "segmentation":
        labels = pred.argmax(0)[None, None].float()
        labels = F.interpolate(labels, size=size, mode="nearest-exact")[0, 0].long()
        return colorize(spec, labels)
    pred = F.interpolate(pred[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return colorize(spec, pred, logits=spec.kind in ("saliency", "edge"))


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    from .core.atomic import atomic_write

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"cannot encode a PNG for {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.tobytes()))


@torch.no_grad()
def predict_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike],
                   out: str | os.PathLike | None = None, tasks: Sequence[str] | None = None,
                   device: str = "auto", batch_size: int = 8, compile: bool = False) -> list[Path]:
    """Predict every image with the model at `model_path` and write `<out>/<stem>_<task>.png` per image and task.

    `images`: files or folders (their images). `model_path`: an extracted model directory, or a full checkpoint /
    run directory (with `tasks`, default all). Returns the written paths, image by image. OutputPathError, before
    anything is written, when an output would overwrite an input image or another output.
    """
    from .core.atomic import ensure_dir

    if not images:
        raise DataError("no images given")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise OutputPathError(f"--out {out} is an existing file, not a folder")
    predict, specs, size, dev = load_predictor(model_path, tasks, device, compile=compile)
    files = image_files(images)
    targets = output_paths(files, list(specs), out)
    arrays = read_images(files)
    if out is not None:
        ensure_dir(out, "--out")
    written = []
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start:start + batch_size]
        preds = predict(torch.stack([preprocess(a, size) for a in chunk]).to(dev))
        for i, array in enumerate(chunk):
            for dst, (task, spec) in zip(targets[start + i], specs.items(), strict=True):
                rgb = render(spec, preds[task][i].cpu(), array.shape[:2])
                written.append(_write_png(dst, rgb))
    return written
