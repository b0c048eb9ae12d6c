"""Tiny Taskonomy trees in the published formats, written from the dataset's specifications, not modsquad's writer.

Sources of each encoding: the Taskonomy data README (StanfordVL/taskonomy: depth in 1/512 m as 16-bit PNG, normals
and curvature 127-centred 8-bit, curvature in the first two channels), the official loaders (StanfordVL/taskonomy
`load_ops.py` / `task_data_loading.py`: depth >= 64500 is "no mesh"; class_object files are 1000 logits that the
loader softmaxes, class_scene 365 scores renormalised by their sum) and omnidata's task configs (EPFL-VILAB/omnidata
`task_configs.py`: normal mask value 0.502 = grey 128, principal_curvature mask value 0, `mask_valid` 0 = invalid,
stored under `mask_valid/` with the depth_zbuffer domain name; segment_semantic files are `_domain_segmentsemantic`).

Files are written with OpenCV / NumPy directly. `make_taskonomy_tree` returns what a correct loader must decode, per
sample and task: the target in the units the task registry documents and the validity mask, so tests compare
pixel by pixel. The PASCAL_MT counterpart is `pascal_fixture.make_pascal_context_tree`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .pascal_fixture import make_pascal_context_tree  # noqa: F401  (re-exported: the PASCAL_MT builder)

#: Buildings of the shipped tiny split tables, so the trees work with split names and no ROOT/splits folder.
TRAIN_BUILDINGS = ("allensville", "beechwood")
VAL_BUILDINGS = ("collierville",)
TEST_BUILDINGS = ("ihlen",)
LAYOUTS = ("omnidata", "flat")
# (point, view) pairs per building; 5 and 0 are chosen out of order so pairing by name, not listing, is tested
VIEWS = ((5, 0), (0, 1))
MESH_TASKS = ("depth_euclidean", "depth_zbuffer", "normal", "principal_curvature", "reshading", "edge_occlusion")
FILE_DOMAIN = {"segment_semantic": "segmentsemantic", "mask_valid": "depth_zbuffer"}


def file_path(root: Path, layout: str, folder: str, building: str, point: int, view: int, ext: str = "png") -> Path:
    """`<folder>/taskonomy/<building>/...` (omnidata downloader) or `<folder>/<building>/...` (flat)."""
    base = root / folder / "taskonomy" / building if layout == "omnidata" else root / folder / building
    return base / f"point_{point}_view_{view}_domain_{FILE_DOMAIN.get(folder, folder)}.{ext}"


def _save_png(path: Path, a: np.ndarray) -> None:
    """uint8 / uint16 grey or RGB -> PNG (OpenCV stores BGR, so colour arrays are flipped here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if a.ndim == 3:
        a = np.ascontiguousarray(a[..., ::-1])
    assert cv2.imwrite(str(path), a), path


def _save_npy(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, a)


def _view_arrays(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stored arrays of every domain of one view, with each encoding's invalid codes in known places."""
    yy, xx = np.mgrid[:size, :size]
    q = size // 4
    zbuf = (512 + 40 * xx + 13 * yy + rng.integers(0, 500)).astype(np.uint16)  # 1 m and up, in 1/512 m
    zbuf[:q, :q] = 65535  # sky / hole
    zbuf[:q, -q:] = 64500 + (xx[:q, -q:] % 1000)  # 64500..65499: no mesh either
    euclid = (zbuf.astype(np.int64) * 11 // 10).clip(0, 64499).astype(np.uint16)
    euclid[zbuf >= 64500] = 65535
    mask_valid = np.full((size, size), 255, np.uint8)
    mask_valid[-q:, :q] = 0  # invalid by the mask_valid domain only (depth is fine there)

    normal = np.stack([127 + (xx * 3) % 100, 127 - (yy * 2) % 90, np.full_like(xx, 230)], -1).astype(np.uint8)
    normal[q:2 * q, q:2 * q] = 128  # grey 128: no normal
    curvature = np.stack([(40 + 5 * xx) % 250 + 2, (200 - 3 * yy) % 250 + 2, rng.integers(0, 256, (size, size))],
                         -1).astype(np.uint8)
    curvature[-q:, -q:, :2] = 0  # no geometry
    reshading = ((xx + yy) * 4 % 256).astype(np.uint8)  # 8-bit grey
    edges = {d: ((xx * 977 + yy * 131 * (i + 1)) % 65536).astype(np.uint16)
             for i, d in enumerate(("edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d"))}
    unsup = {d: ((xx // 4 + yy // 4 * (i + 2)) * 16 % 256).astype(np.uint8)
             for i, d in enumerate(("segment_unsup2d", "segment_unsup25d"))}
    semantic = ((xx // 4 + yy // 4) % 18).astype(np.uint8)  # 0 uncertain, 1 background, 2..17 COCO
    logits = rng.normal(0.0, 3.0, 1000).astype(np.float32)  # signed, as ResNet-152 logits
    places = rng.random(365).astype(np.float32) * 4.0  # non-negative scores, sum != 1
    rgb = np.stack([xx * 7 % 256, yy * 5 % 256, (xx + yy) * 3 % 256], -1).astype(np.uint8)
    return {"rgb": rgb, "depth_zbuffer": zbuf, "depth_euclidean": euclid, "mask_valid": mask_valid,
            "normal": normal, "principal_curvature": curvature, "reshading": reshading, **edges, **unsup,
            "segment_semantic": semantic, "class_object": logits, "class_scene": places}


def expected_labels(stored: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What the specifications say each stored array means: task -> (target, valid), as the loader yields them
    (dense float [C, H, W] / segmentation int [H, W] / classification [C]; masks bool [H, W] or a bool)."""
    mesh = (stored["depth_zbuffer"] < 64500) & (stored["mask_valid"] > 0)
    out = {}
    for d in ("depth_zbuffer", "depth_euclidean"):
        out[d] = (stored[d].astype(np.float64)[None] / 512.0, stored[d] < 64500)
    n = (stored["normal"].astype(np.float64) - 127.0) / 127.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    out["normal"] = ((n / np.maximum(norm, 1e-6)).transpose(2, 0, 1), norm[..., 0] > 0.5)
    c = stored["principal_curvature"].astype(np.float64)
    out["principal_curvature"] = (((c[..., :2] - 127.0) / 127.0).clip(-1, 1).transpose(2, 0, 1),
                                  (c[..., 0] > 0) | (c[..., 1] > 0))
    shading = stored["reshading"].astype(np.float64) / 255.0
    out["reshading"] = (np.repeat(shading[None], 3, 0), np.ones(shading.shape, bool))
    for d in ("edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d"):
        out[d] = (stored[d].astype(np.float64)[None] / 65535.0, np.ones(stored[d].shape, bool))
    for d in ("segment_unsup2d", "segment_unsup25d"):
        out[d] = (stored[d].astype(np.float64)[None] / 255.0, np.ones(stored[d].shape, bool))
    sem = stored["segment_semantic"].astype(np.int64)
    out["segment_semantic"] = (np.where(sem > 0, sem, 255), sem > 0)
    z = stored["class_object"].astype(np.float64)
    out["class_object"] = (np.exp(z - z.max()) / np.exp(z - z.max()).sum(), True)
    out["class_scene"] = (stored["class_scene"] / stored["class_scene"].sum(dtype=np.float64), True)
    for task in MESH_TASKS:  # the official training masks "no mesh" pixels of these domains
        target, valid = out[task]
        valid = valid & mesh
        out[task] = (np.where(valid, target, 0.0), valid)
    return out


def make_taskonomy_tree(root: str | Path, layout: str = "omnidata", size: int = 32, seed: int = 0,
                        buildings: tuple[str, ...] = TRAIN_BUILDINGS + VAL_BUILDINGS + TEST_BUILDINGS
                        ) -> dict[tuple[str, int, int], dict]:
    """Write every supported domain (and mask_valid) of a few views in `layout`; returns, per (building, point,
    view), {"stored": arrays as written, "expected": expected_labels(stored)}."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    truth = {}
    for b in buildings:
        for p, v in VIEWS:
            stored = _view_arrays(size, rng)
            for domain, a in stored.items():
                if domain.startswith("class_"):
                    _save_npy(file_path(root, layout, domain, b, p, v, "npy"), a)
                else:
                    _save_png(file_path(root, layout, domain, b, p, v), a)
            truth[(b, p, v)] = {"stored": stored, "expected": expected_labels(stored)}
    return truth
