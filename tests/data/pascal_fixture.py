"""Build a tiny fake PASCAL-Context tree in the PASCAL_MT layout (what `PascalContextDataset` reads).

Three kinds of images: one with an annotated person (parts head, torso, left upper arm, left lower leg), one with
only a dog (human_parts all ignored), one with a person without part annotations (also ignored).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.io as sio
from PIL import Image

TRAIN_IDS = ("2008_000002", "2008_000003", "2008_000007")
VAL_IDS = ("2008_000009", "2008_000016")


def _parts_struct(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    s = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
    for i, (name, mask) in enumerate(parts):
        s[0, i] = (name, mask.astype(np.uint8))
    return s


def _anno(image_id: str, objects: list[tuple[str, int, np.ndarray, list]]) -> dict:
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (cls, ind, mask, parts) in enumerate(objects):
        objs[0, i] = (cls, np.array([[ind]]), mask.astype(np.uint8),
                      _parts_struct(parts) if parts else np.zeros((0, 0)))
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_id, objs)
    return {"anno": anno}


def make_pascal_context_tree(root: str | Path, size: int = 48, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Write the tree under root; returns, per image id, the arrays written (semseg, parts, sal, normals, LabelMap).

    Images are square (size x size) so that an eval-mode dataset at img_size=size reads labels back unchanged.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "human_parts", "normals_distill", "sal_distill",
              "pascal-context/trainval"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(TRAIN_IDS) + "\n")
    (root / "ImageSets/Context/val.txt").write_text("\n".join(VAL_IDS) + "\n")
    truth = {}
    yy, xx = np.mgrid[:size, :size]
    for k, image_id in enumerate(TRAIN_IDS + VAL_IDS):
        rgb = np.stack([xx * 4, yy * 4, np.full_like(xx, rng.integers(0, 200))], -1).clip(0, 255).astype(np.uint8)
        rgb[size // 4:size // 2, size // 4:] = (200, 40, 40)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

        semseg = np.zeros((size, size), np.uint8)
        semseg[size // 4:size // 2, size // 4:] = 15  # person
        semseg[size // 2:, : size // 3] = 12  # dog
        semseg[size // 4 - 1, :] = 255  # a boundary strip, ignored
        im = Image.fromarray(semseg)
        if k == 0:  # VOC-style palette PNG: indices must be read, not colours
            im = im.convert("P")
            im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
        im.save(root / "semseg" / "VOC12" / f"{image_id}.png")

        person = semseg == 15
        head, torso = person & (xx < size // 2), person & (xx >= size // 2)
        arm = np.zeros_like(person)
        arm[: size // 8, : size // 8] = True
        leg = np.zeros_like(person)
        leg[-size // 8:, -size // 8:] = True
        if k % 3 == 0:
            objects = [("person", 15, person, [("head", head), ("torso", torso), ("luarm", arm), ("llleg", leg)]),
                       ("dog", 12, semseg == 12, [])]
            parts = np.zeros((size, size), np.int64)
            parts[head], parts[torso], parts[arm], parts[leg] = 1, 2, 3, 6
        elif k % 3 == 1:
            objects, parts = [("dog", 12, semseg == 12, [])], None
        else:
            objects, parts = [("person", 15, person, [])], None
        sio.savemat(root / "human_parts" / f"{image_id}.mat", _anno(image_id, objects))

        sal = np.where(person, 220, 10).astype(np.uint8)
        cv2.imwrite(str(root / "sal_distill" / f"{image_id}.png"), sal)

        n = np.stack([np.sin(xx / size * 2), np.cos(yy / size * 3), np.ones_like(xx, dtype=np.float64)], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n_png = np.round((n + 1) / 2 * 255).astype(np.uint8)
        cv2.imwrite(str(root / "normals_distill" / f"{image_id}.png"), cv2.cvtColor(n_png, cv2.COLOR_RGB2BGR))

        label_map = np.full((size, size), 5, np.uint16)
        label_map[semseg == 15] = 284
        label_map[semseg == 12] = 45
        sio.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
        truth[image_id] = {"rgb": rgb, "semseg": semseg, "parts": parts, "sal": sal > 127,
                           "normals": 2.0 * n_png / 255.0 - 1.0, "label_map": label_map}
    return truth
