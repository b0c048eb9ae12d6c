"""Taskonomy (and the synthetic suite, which is written in the same layout).

Files live at `ROOT/<domain>/<building>/point_<p>_view_<v>_domain_<domain>.<ext>` or, as the omnidata downloader
writes them, `ROOT/<domain>/taskonomy/<building>/...`. Domains of one image are paired by the (point, view)
parsed from the file name, never by directory listing order. Splits are lists of buildings: `ROOT/splits/<split>.txt`
when the root has one (the synthetic suite does), else `data/splits/taskonomy_<split_set>_<split>.txt`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import DataError, UnknownNameError
from ..tasks.registry import IGNORE_INDEX, TaskSpec, decode_mask_valid, depth_has_mesh, get_task, list_tasks
from .io import read_any, read_image, read_rgb
from .transforms import JointTransform

log = logging.getLogger(__name__)

FILE_RE = re.compile(r"^point_(\d+)_view_(\d+)_domain_([A-Za-z0-9_]+)\.(png|npy|jpg|jpeg)$")
NESTED = "taskonomy"  # omnidata layout: ROOT/<domain>/taskonomy/<building>/
SPLITS_DIR = Path(__file__).resolve().parents[2] / "data" / "splits"
ON_ERROR = ("raise", "skip")
#: Folder of the per-pixel validity masks the omnidata downloader ships (files `..._domain_depth_zbuffer.png`).
MASK_VALID = "mask_valid"
#: Tasks whose labels are meaningless where the camera sees no mesh: masked by the shared validity mask (depth
#: >= 64500 and `mask_valid`), as the official Taskonomy training masks them.
MESH_TASKS = ("depth_euclidean", "depth_zbuffer", "normal", "principal_curvature", "reshading", "edge_occlusion")
#: Depth domains read for the validity mask, in order of preference (the official loader uses depth_zbuffer).
MESH_DEPTHS = ("depth_zbuffer", "depth_euclidean")

Key = tuple[str, int, int]  # (building, point, view)


def taskonomy_tasks() -> list[str]:
    """Every registered task that has a Taskonomy-format codec (a domain folder of its own)."""
    return [t for t in list_tasks("taskonomy") if get_task(t).decode is not None]


def taskonomy_spec(task: str) -> TaskSpec:
    """The registry spec of a task stored as a Taskonomy domain; UnknownNameError for any other task."""
    spec = get_task(task)
    if spec.decode is None:
        raise UnknownNameError(f"task {task!r} is not a Taskonomy domain; Taskonomy tasks: "
                               f"{', '.join(taskonomy_tasks())}")
    return spec


def building_dirs(root: str | Path, domain: str) -> dict[str, Path]:
    """Building name -> folder for one domain, from both the flat and the omnidata (`taskonomy/`) layout."""
    out: dict[str, Path] = {}
    for base in (Path(root) / domain / NESTED, Path(root) / domain):
        if base.is_dir():
            for entry in os.scandir(base):
                if entry.is_dir() and entry.name != NESTED and entry.name not in out:
                    out[entry.name] = Path(entry.path)
    return out


def index_domain(root: str | Path, domain: str, buildings: Sequence[str] | None = None) -> dict[Key, Path]:
    """(building, point, view) -> file of `domain`, parsed from file names."""
    index: dict[Key, Path] = {}
    for b, folder in building_dirs(root, domain).items():
        if buildings is not None and b not in buildings:
            continue
        for entry in os.scandir(folder):
            m = FILE_RE.match(entry.name)
            if m:
                index[(b, int(m.group(1)), int(m.group(2)))] = Path(entry.path)
    return index


def read_split_file(path: str | Path) -> list[str]:
    """Building names, one a line; blank lines and `#` comments are ignored."""
    lines = (ln.split("#", 1)[0].strip() for ln in Path(path).read_text().splitlines())
    return [ln for ln in lines if ln]


def split_file(root: str | Path, split: str, split_set: str | None = None,
               splits_dir: str | Path | None = None) -> Path:
    """The split list used for `split`: ROOT/splits/<split>.txt, else the shipped `taskonomy_<set>_<split>.txt`."""
    own = Path(root) / "splits" / f"{split}.txt"
    if own.is_file():
        return own
    shipped = Path(splits_dir or SPLITS_DIR) / f"taskonomy_{split_set or 'tiny'}_{split}.txt"
    if shipped.is_file():
        return shipped
    raise DataError(f"no building list for split {split!r}: looked for {own} and {shipped} "
                    f"(see data/README.md to make one from the official split table)")


def resolve_buildings(root: str | Path, split: str | None, split_set: str | None = None,
                      splits_dir: str | Path | None = None) -> list[str]:
    """Buildings of `split` that exist under ROOT/rgb (all of them when split is None or "all")."""
    present = building_dirs(root, "rgb")
    if not present:
        raise DataError(f"no rgb images under {Path(root) / 'rgb'} (expected rgb/<building>/point_*_view_*"
                        f"_domain_rgb.png or rgb/taskonomy/<building>/...)")
    if split in (None, "all"):
        return sorted(present)
    path = split_file(root, split, split_set, splits_dir)
    wanted = read_split_file(path)
    found = [b for b in wanted if b in present]
    if not found:
        raise DataError(f"none of the {len(wanted)} buildings of split {split!r} ({path}) are under "
                        f"{Path(root) / 'rgb'}")
    if len(found) < len(wanted):
        log.warning("split %s (%s): %d of %d buildings are not downloaded, using %d", split, path,
                    len(wanted) - len(found), len(wanted), len(found))
    return found


def decode_file(path: Path, spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode one label file; DataError naming the file on anything unreadable."""
    raw = read_any(path)
    try:
        return spec.decode(raw)
    except (ValueError, IndexError, TypeError) as e:
        raise DataError(f"cannot decode {path} as {spec.name}: {e}") from None


def label_shape_error(path: Path, spec: TaskSpec, target: np.ndarray, hw: tuple[int, int]) -> str | None:
    """Why a decoded label does not fit the image of size hw (None when it fits)."""
    if spec.is_dense and tuple(target.shape[-2:]) != hw:
        return f"wrong shape {path}: {target.shape[-2]}x{target.shape[-1]}, rgb is {hw[0]}x{hw[1]}"
    if not spec.is_dense and target.shape != (spec.channels,):
        return f"wrong shape {path}: {target.shape[0]} classes, {spec.name} has {spec.channels}"
    return None


def empty_target(spec: TaskSpec, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and all-False mask for a missing label (same shapes as a real one, so default_collate works)."""
    if spec.kind == "classification":
        return torch.zeros(spec.channels), torch.tensor(False)
    if spec.kind == "segmentation":
        return torch.full((size, size), IGNORE_INDEX, dtype=torch.long), torch.zeros(size, size, dtype=torch.bool)
    return torch.zeros(spec.channels, size, size), torch.zeros(size, size, dtype=torch.bool)


def finish_targets(specs: dict[str, TaskSpec], size: int, dense: dict, dense_valid: dict, cls: dict,
                   cls_valid: dict) -> tuple[dict, dict]:
    """Assemble `targets`/`masks` in task order from transformed dense labels and classification vectors."""
    targets, masks = {}, {}
    for task, spec in specs.items():
        if task in dense:
            t, m = dense[task], dense_valid[task]
            if spec.kind == "segmentation":
                t = t.round().long()
                t[~m] = IGNORE_INDEX
            targets[task], masks[task] = t, m
        elif task in cls:
            targets[task] = torch.from_numpy(np.asarray(cls[task], dtype=np.float32))
            masks[task] = torch.tensor(bool(cls_valid[task]))
        else:
            targets[task], masks[task] = empty_target(spec, size)
    return targets, masks


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """k indices spread over range(n) (all of them when k is None or >= n), so subsets see every building."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(k, 1)).round().astype(np.int64))


class SkippingDataset(Dataset):
    """A dataset whose `on_error="skip"` mode moves past unreadable samples instead of failing.

    Subclasses set `on_error` and `skipped`, and define `_load(index)`, `sample_id(index)` and `image_dir()`.
    """

    on_error: str = "raise"
    skipped: int = 0
    max_skips_in_a_row = 20

    def __getitem__(self, index: int) -> dict:
        for _ in range(min(len(self), self.max_skips_in_a_row)):
            try:
                return self._load(index)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                log.warning("skipping %s: %s", self.sample_id(index), e)
                self.skipped += 1
                index = (index + 1) % len(self)
        raise DataError(f"too many unreadable images in a row under {self.image_dir()} (last at {index})")


class TaskonomyDataset(SkippingDataset):
    """Taskonomy-layout images with the labels of `tasks`, as `{"image", "targets", "masks", "id"}` samples.

    image: float32 [3, S, S] normalised with the ImageNet mean/std; targets/masks per task as the task registry
    describes them (dense: [C, S, S] / [S, S], segmentation long [S, S], classification [C] / 0-dim bool). A missing
    label file gives a zero target and an all-False mask (counted in `missing`); invalid pixels of each encoding
    (depth >= 64500, grey-128 normals, 0 curvature, segment id 0) are False in the mask. Pixels without mesh are
    also masked for MESH_TASKS: a shared per-sample validity mask from `mask_valid/` (when the root has it) and
    from depth (depth_zbuffer when the root has it, else a loaded depth_euclidean), as the official loader does.

    Args:
        root: dataset root.
        tasks: Taskonomy task names (registry names are the domain folder names).
        split: "train", "val", "test", another name with a split file, or None / "all" for every building.
        img_size: output side S.
        train: augment (resize 256/224 x S, random crop, flip, colour jitter) or only resize.
        split_set: which shipped split list to use when ROOT has no `splits/` folder ("tiny", "medium", ...).
        buildings: explicit building list (overrides split).
        max_images: keep this many samples, evenly spread over the split.
        on_error: "raise" a DataError naming the file on corrupt or wrong-shaped files, or "skip" them with a
            logged warning (a bad label is treated as missing; a bad image moves on to the next sample).
        transform: a callable like `JointTransform` to use instead of the default.
        mask_no_mesh: apply the shared validity mask to MESH_TASKS (False: each file's own invalid codes only).
    """

    def __init__(self, root: str | Path, tasks: Sequence[str], split: str | None = "train", img_size: int = 224,
                 train: bool = False, *, split_set: str | None = None, buildings: Sequence[str] | None = None,
                 max_images: int | None = None, on_error: str = "raise", transform=None,
                 splits_dir: str | Path | None = None, mask_no_mesh: bool = True):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root, self.split, self.img_size, self.train = Path(root), split, int(img_size), bool(train)
        self.on_error = on_error
        self.specs = {t: taskonomy_spec(t) for t in tasks}
        self.tasks = list(self.specs)
        if buildings is None:
            buildings = resolve_buildings(self.root, split, split_set, splits_dir)
        self.buildings = list(buildings)

        order = {b: i for i, b in enumerate(self.buildings)}
        rgb = index_domain(self.root, "rgb", self.buildings)
        keys = sorted(rgb, key=lambda k: (order[k[0]], k[1], k[2]))
        if not keys:
            raise DataError(f"no rgb images of buildings {', '.join(self.buildings[:5])}"
                            f"{' ...' if len(self.buildings) > 5 else ''} under {self.root / 'rgb'}")
        self.samples: list[Key] = [keys[i] for i in evenly_spaced(len(keys), max_images)]
        self.paths: dict[str, dict[Key, Path]] = {"rgb": rgb}
        self.missing: dict[str, int] = {}
        self.buildings_missing: dict[str, dict[str, int]] = {}
        for task in self.tasks:
            self.paths[task] = index_domain(self.root, task, self.buildings)
            lacking = [k for k in self.samples if k not in self.paths[task]]
            self.missing[task] = len(lacking)
            for b, *_ in lacking:
                self.buildings_missing.setdefault(b, {}).setdefault(task, 0)
                self.buildings_missing[b][task] += 1
            if lacking and len(lacking) == len(self.samples):
                msg = f"no {task} files for split {split!r} under {self.root / task}"
                if on_error == "raise":
                    raise DataError(msg + " (download that domain, or drop the task)")
                log.warning("%s; its loss and metrics will be masked out", msg)
        if self.buildings_missing:
            desc = "; ".join(f"{b} ({', '.join(f'{t} {n}' for t, n in d.items())})"
                             for b, d in list(self.buildings_missing.items())[:10])
            log.warning("%s: %d buildings miss label files (masked out of losses and metrics): %s",
                        self.root, len(self.buildings_missing), desc)
        self.mesh_sources: dict[str, dict[Key, Path]] = {}
        if mask_no_mesh and any(t in MESH_TASKS for t in self.tasks):
            for domain in (MASK_VALID, *MESH_DEPTHS):
                index = self.paths.get(domain) or index_domain(self.root, domain, self.buildings)
                if index and (domain == MASK_VALID or not any(d in self.mesh_sources for d in MESH_DEPTHS)):
                    self.mesh_sources[domain] = index
        kinds = {t: s.kind for t, s in self.specs.items() if s.is_dense}
        self.transform = transform or JointTransform(self.img_size, self.train, kinds, crop="resize_crop")
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def sample_id(self, index: int) -> str:
        b, p, v = self.samples[index]
        return f"{b}/point_{p}_view_{v}"

    def image_dir(self) -> Path:
        return self.root / "rgb"

    def mesh_mask(self, key: Key, hw: tuple[int, int]) -> np.ndarray | None:
        """bool [H, W]: where the sample's pixels see the mesh (None when no source covers this sample).

        AND of `mask_valid` (nonzero) and depth < 64500 from the first depth domain the root has.
        """
        mask = None
        for domain, index in self.mesh_sources.items():
            path = index.get(key)
            if path is None:
                continue
            raw = read_image(path)
            if tuple(raw.shape[:2]) != tuple(hw):
                raise DataError(f"wrong shape {path}: {raw.shape[0]}x{raw.shape[1]}, rgb is {hw[0]}x{hw[1]}")
            valid = decode_mask_valid(raw) if domain == MASK_VALID else depth_has_mesh(raw)
            mask = valid if mask is None else mask & valid
        return mask

    def _load(self, index: int) -> dict:
        key = self.samples[index]
        rgb = read_rgb(self.paths["rgb"][key])
        hw = rgb.shape[:2]
        mesh = self.mesh_mask(key, hw) if self.mesh_sources else None
        dense, dense_valid, cls, cls_valid = {}, {}, {}, {}
        for task, spec in self.specs.items():
            path = self.paths[task].get(key)
            if path is None:
                continue
            try:
                target, valid = decode_file(path, spec)
                err = label_shape_error(path, spec, target, hw)
                if err:
                    raise DataError(err)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                log.warning("treating %s of %s as missing: %s", task, self.sample_id(index), e)
                continue
            if spec.is_dense:
                if mesh is not None and task in MESH_TASKS:
                    valid = valid & mesh
                    target[..., ~valid] = 0.0
                dense[task], dense_valid[task] = target, valid
            else:
                cls[task], cls_valid[task] = target, valid
        image, dense, dense_valid = self.transform(rgb, dense, dense_valid)
        targets, masks = finish_targets(self.specs, image.shape[-1], dense, dense_valid, cls, cls_valid)
        return {"image": image, "targets": targets, "masks": masks, "id": self.sample_id(index)}
