"""`modsquad predict`: run an extracted (or full) model on image files and write colourised predictions.

    paths = predict_images("out/extracted/depth_euclidean", ["a.jpg", "b.png"], out="preds")

Images of any size are resized to the model's input size, normalised with the ImageNet mean/std (as in
training), predicted, and the prediction is mapped back to the image's own size: bilinear for maps, nearest for
segmentation labels (after the argmax). Each prediction is written as `<out>/<stem>_<task>.png` (next to the
input image when no `out` is given) with `modsquad.tasks.visualize.colorize`: a colour map for depth and other
scalar maps, normals as RGB, the VOC palette for labels, grey probabilities for saliency and edges, a top-5 bar
chart for classification. Every image is read before anything is written, and every PNG is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, UnknownNameError
from .tasks.visualize import IMAGENET_MEAN, IMAGENET_STD, colorize

Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_predictor(model_path: str | os.PathLike, tasks: Sequence[str] | None = None, device: str = "auto"
                   ) -> tuple[Predictor, dict, tuple[int, int], torch.device]:
    """(images -> {task: prediction}, {task: TaskSpec}, input size (H, W), device) for an extracted model
    directory (config.json) or a full checkpoint / run directory (all its tasks unless `tasks` is given)."""
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

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {sub.task: sub(images)}
    else:
        model = load_model(path).to(dev)
        selected = list(tasks) if tasks else list(model.tasks)
        for task in selected:
            model.task_index(task)  # UnknownNameError naming the model's tasks
        specs, size = {t: model.task_specs[t] for t in selected}, model.config["img_size"]

        def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return model(images, tasks=selected)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return predict, specs, size, dev


def read_images(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """uint8 RGB [H, W, 3] of every file; DataError naming the first that is missing or cannot be decoded."""
    from .data.io import read_rgb

    images = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"image not found: {p}")
        images.append(read_rgb(p))
    return images


def preprocess(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float [3, h, w] at the model's size, ImageNet-normalised (as eval transforms do)."""
    h, w = size
    interp = cv2.INTER_AREA if image.shape[0] > h and image.shape[1] > w else cv2.INTER_LINEAR
    x = cv2.resize(image, (w, h), interpolation=interp).astype(np.float32) / 255.0
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
    from .engine.checkpoint import atomic_write

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"cannot encode a PNG for {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.tobytes()))


@torch.no_grad()
def predict_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike],
                   out: str | os.PathLike | None = None, tasks: Sequence[str] | None = None,
                   device: str = "auto", batch_size: int = 8) -> list[Path]:
    """Predict every image with the model at `model_path` and write `<out>/<stem>_<task>.png` per image and task.

    `model_path`: an extracted model directory, or a full checkpoint / run directory (with `tasks`, default all).
    Returns the written paths, image by image.
    """
    if not images:
        raise DataError("no images given")
    predict, specs, size, dev = load_predictor(model_path, tasks, device)
    arrays = read_images(images)
    written = []
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start:start + batch_size]
        preds = predict(torch.stack([preprocess(a, size) for a in chunk]).to(dev))
        for i, array in enumerate(chunk):
            src = Path(images[start + i])
            folder = Path(out) if out is not None else src.parent
            for task, spec in specs.items():
                rgb = render(spec, preds[task][i].cpu(), array.shape[:2])
                written.append(_write_png(folder / f"{src.stem}_{task}.png", rgb))
    return written
