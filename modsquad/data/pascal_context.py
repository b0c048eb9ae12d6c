"""PASCAL-Context in the common multi-task layout (PASCAL_MT, as the ASTMT / MTI-Net benchmarks lay it out).

    ROOT/JPEGImages/<id>.jpg
    ROOT/ImageSets/Context/{train,val}.txt          image ids, one a line
    ROOT/semseg/VOC12/<id>.png                      21 classes, 255 ignored (else semseg/pascal-context/<id>.png)
    ROOT/human_parts/<id>.mat                       PASCAL-Part `anno` struct; person parts grouped into 6
    ROOT/normals_distill/<id>.png                   8-bit RGB, n = 2 x / 255 - 1
    ROOT/sal_distill/<id>.png                       8-bit, salient where x / 255 > 0.5
    ROOT/pascal-context/trainval/<id>.mat           `LabelMap`; edges are the boundaries between its labels

Normals are scored, as in the benchmark, only on pixels whose `LabelMap` class is one of the 170 Context classes
that are NYU classes (plus tvmonitor): `normals_valid_classes="benchmark"` (the default; the id list ships as
`pascal_normals_classes.json`), "all" for every pixel with a non-degenerate stored normal, or explicit ids.
Difference from the reference loaders: edges are the pixels whose right or lower neighbour has another label (one
pixel wide, no skimage thinning).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import DataError, UnknownNameError
from ..tasks.registry import IGNORE_INDEX, PASCAL_CONTEXT_TASKS, get_task
from .io import read_label_png, read_mat, read_rgb
from .taskonomy import ON_ERROR, SkippingDataset, evenly_spaced, finish_targets
from .transforms import JointTransform

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
NORMALS_CLASSES_FILE = Path(__file__).with_name("pascal_normals_classes.json")
NORMALS_CLASS_CHOICES = ("benchmark", "all")
VOC_PERSON = 15
#: PASCAL-Part person part names -> the 6 groups of the benchmark (0 = background).
HUMAN_PART_GROUPS = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}


def benchmark_normals_classes() -> np.ndarray:
    """The 170 Context label ids on which the benchmark scores normals (int64 [170])."""
    return np.asarray(json.loads(NORMALS_CLASSES_FILE.read_text())["ids"], dtype=np.int64)


def resolve_normals_classes(value: str | Sequence[int] | None, field: str = "data.normals_valid_classes"
                            ) -> np.ndarray | None:
    """Context ids on which normals count, from "benchmark", "all" / None (no class mask), a list of ids, or
    a file (a JSON list, a JSON object with "ids", or one id a line); DataError naming `field` otherwise."""
    if value is None or (isinstance(value, str) and value == "all"):
        return None
    if isinstance(value, str) and value == "benchmark":
        return benchmark_normals_classes()
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"{field}: {value!r} is neither {' nor '.join(NORMALS_CLASS_CHOICES)} nor a file of "
                            f"Context class ids")
        text = path.read_text()
        try:
            data = json.loads(text)
            value = data["ids"] if isinstance(data, dict) else data
        except (json.JSONDecodeError, KeyError, TypeError):
            value = text.split()
    try:
        ids = np.asarray([int(v) for v in value], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{field}: expected Context class ids (integers), got {value!r}") from None
    if ids.size == 0:
        raise DataError(f"{field}: the list of Context class ids is empty (use 'all' to keep every pixel)")
    return ids


def image_ids(root: str | Path, split: str) -> list[str]:
    path = Path(root) / "ImageSets" / "Context" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"PASCAL-Context split file {path} not found (expected the PASCAL_MT layout, "
                        f"see data/README.md)")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def task_path(root: str | Path, task: str, image_id: str) -> Path:
    """Where the label of `task` for `image_id` lives (for semseg: VOC12 first, then pascal-context)."""
    root = Path(root)
    if task == "semseg":
        voc = root / "semseg" / "VOC12" / f"{image_id}.png"
        return voc if voc.is_file() else root / "semseg" / "pascal-context" / f"{image_id}.png"
    return root / {"human_parts": f"human_parts/{image_id}.mat", "sal": f"sal_distill/{image_id}.png",
                   "normals": f"normals_distill/{image_id}.png",
                   "edge": f"pascal-context/trainval/{image_id}.mat"}[task]


def image_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / "JPEGImages" / f"{image_id}.jpg"


def load_label_map(path: Path) -> np.ndarray:
    """The Context `LabelMap` [H, W] of a trainval .mat file."""
    mat = read_mat(path)
    if "LabelMap" not in mat:
        raise DataError(f"unreadable .mat file {path}: no LabelMap")
    return np.asarray(mat["LabelMap"])


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """float [H, W] in {0, 1}: 1 where the right or lower neighbour carries another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1] |= labels[1:] != labels[:-1]
    return edge.astype(np.float32)


def load_human_parts(path: Path, hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Person parts [H, W] int64 in 0..6 and whether the image has any annotated person."""
    anno = read_mat(path, squeeze_me=True, struct_as_record=False).get("anno")
    if anno is None or not hasattr(anno, "objects"):
        raise DataError(f"unreadable .mat file {path}: no anno.objects (not a PASCAL-Part annotation)")
    target = np.zeros(hw, dtype=np.int64)
    found = False
    for obj in np.atleast_1d(anno.objects):
        parts = np.atleast_1d(getattr(obj, "parts", []))
        if int(np.asarray(obj.class_ind).reshape(-1)[0]) != VOC_PERSON or parts.size == 0:
            continue
        found = True
        for part in parts:
            group = HUMAN_PART_GROUPS.get(str(part.part_name))
            mask = np.asarray(part.mask).astype(bool)
            if group is None:
                continue
            if mask.shape != hw:
                raise DataError(f"wrong shape {path}: part mask {mask.shape}, image is {hw}")
            target[mask] = group
    return target, found


def decode_label(root: str | Path, task: str, image_id: str, hw: tuple[int, int],
                 normals_valid_classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One label as (target, valid): segmentation int64 [H, W], others float [C, H, W]; valid bool [H, W].

    Raises DataError naming the file when it is missing, unreadable or not of the image's size hw.
    """
    path = task_path(root, task, image_id)
    if task == "semseg":
        a = read_label_png(path).astype(np.int64)
        target, valid = a, a < get_task(task).channels  # 255 (and anything unknown) is ignored
    elif task == "human_parts":
        target, has_person = load_human_parts(path, hw)
        valid = np.full(hw, has_person)
    elif task == "sal":
        a = read_label_png(path)
        target, valid = (a.astype(np.float32) / 255.0 > 0.5).astype(np.float32)[None], np.ones(a.shape, bool)
    elif task == "normals":
        n = (2.0 * read_rgb(path).astype(np.float32) / 255.0 - 1.0).transpose(2, 0, 1)
        norm = np.linalg.norm(n, axis=0)
        valid = norm > 0.5
        target = n / np.maximum(norm, 1e-6)
        if normals_valid_classes is not None:
            label_path = task_path(root, "edge", image_id)
            if not label_path.is_file():
                raise DataError(f"missing file {label_path}: the normals class mask reads its LabelMap "
                                f"(set data.normals_valid_classes=all to score every pixel)")
            label_map = load_label_map(label_path)
            if label_map.shape != n.shape[1:]:
                raise DataError(f"wrong shape {label_path}: {label_map.shape[0]}x{label_map.shape[1]}, normals "
                                f"are {n.shape[1]}x{n.shape[2]}")
            valid &= np.isin(label_map, normals_valid_classes)
    else:
        labels = load_label_map(path)
        target, valid = label_boundaries(labels)[None], np.ones(labels.shape, bool)
    if tuple(target.shape[-2:]) != tuple(hw):
        raise DataError(f"wrong shape {path}: {target.shape[-2]}x{target.shape[-1]}, image is {hw[0]}x{hw[1]}")
    target[..., ~valid] = IGNORE_INDEX if task in ("semseg", "human_parts") else 0
    return target, valid


class PascalContextDataset(SkippingDataset):
    """PASCAL-Context multi-task samples `{"image", "targets", "masks", "id"}` (layouts as in the task registry).

    semseg / human_parts: long [S, S] with IGNORE_INDEX where unlabelled (human_parts is all ignored on images
    without annotated people); sal / edge: float [1, S, S] in {0, 1}; normals: float [3, S, S] unit vectors.

    Args:
        root: the PASCAL_MT folder.
        tasks: subset of semseg, human_parts, sal, normals, edge.
        split: "train" or "val" (ids from ImageSets/Context/<split>.txt).
        img_size: output side S (the benchmark uses 512).
        train: augment (random resized crop with `scale`, flip, colour jitter) or only resize.
        max_images, on_error, transform: as for `TaskonomyDataset`.
        normals_valid_classes: where normals count: "benchmark" (the 170 Context ids of the benchmark, read from
            pascal-context/trainval/<id>.mat), "all" / None (every non-degenerate normal) or explicit Context ids.
    """

    def __init__(self, root: str | Path, tasks: Sequence[str] = PASCAL_CONTEXT_TASKS, split: str = "train",
                 img_size: int = 512, train: bool = False, *, max_images: int | None = None,
                 on_error: str = "raise", transform=None, scale: tuple[float, float] = (0.5, 1.0),
                 normals_valid_classes: str | Sequence[int] | None = "benchmark"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        unknown = [t for t in tasks if t not in PASCAL_CONTEXT_TASKS]
        if unknown:
            raise UnknownNameError(f"task(s) {', '.join(unknown)} are not PASCAL-Context tasks; "
                                   f"choose from {', '.join(PASCAL_CONTEXT_TASKS)}")
        self.root, self.split, self.img_size, self.train = Path(root), split, int(img_size), bool(train)
        self.on_error = on_error
        self.specs = {t: get_task(t) for t in tasks}
        self.tasks = list(self.specs)
        ids = image_ids(self.root, split)
        self.ids = [ids[i] for i in evenly_spaced(len(ids), max_images)]
        if not self.ids:
            raise DataError(f"split {split!r} of {self.root} lists no images")
        self.normals_valid_classes = resolve_normals_classes(normals_valid_classes) if "normals" in tasks else None
        self.missing = {t: sum(not task_path(self.root, t, i).is_file() for i in self.ids) for t in self.tasks}
        for t, n in self.missing.items():
            if n == len(self.ids) and on_error == "raise":
                raise DataError(f"no {t} labels for split {split!r} under {task_path(self.root, t, 'ID').parent}")
            if n:
                log.warning("%s: %d of %d %s labels missing (masked out)", self.root, n, len(self.ids), t)
        kinds = {t: s.kind for t, s in self.specs.items()}
        self.transform = transform or JointTransform(self.img_size, self.train, kinds, crop="random_resized_crop",
                                                     scale=scale)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.ids)

    def sample_id(self, index: int) -> str:
        return self.ids[index]

    def image_dir(self) -> Path:
        return self.root / "JPEGImages"

    def _load(self, index: int) -> dict:
        image_id = self.ids[index]
        rgb = read_rgb(image_path(self.root, image_id))
        hw = rgb.shape[:2]
        dense, dense_valid = {}, {}
        for task in self.tasks:
            if not task_path(self.root, task, image_id).is_file():
                continue
            try:
                dense[task], dense_valid[task] = decode_label(self.root, task, image_id, hw,
                                                              self.normals_valid_classes)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                log.warning("treating %s of %s as missing: %s", task, image_id, e)
        image, dense, dense_valid = self.transform(rgb, dense, dense_valid)
        targets, masks = finish_targets(self.specs, image.shape[-1], dense, dense_valid, {}, {})
        return {"image": image, "targets": targets, "masks": masks, "id": image_id}
