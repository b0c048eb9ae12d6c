"""Joint augmentations: one albumentations pipeline for the image and every dense label, so they stay aligned.

Labels travel as albumentations "mask" targets (nearest interpolation, untouched by colour transforms) together
with a validity mask per task; horizontal flips negate the x component of surface normals, because a normal that
pointed right points left in the mirrored image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# Nearest with pixel-centre alignment (cv2's INTER_NEAREST is off by half a pixel against INTER_LINEAR).
LABEL_INTERPOLATION = cv2.INTER_NEAREST_EXACT
CROP_MODES = ("resize_crop", "random_resized_crop")


class HorizontalFlipNormals(A.HorizontalFlip):
    """`A.HorizontalFlip` that also negates channel 0 (x) of the surface-normal targets named in `normal_keys`.

    Normal maps are float [H, W, 3] in camera frame (x right, y up, z towards the camera).
    """

    def __init__(self, normal_keys: Sequence[str] = (), p: float = 0.5):
        super().__init__(p=p)
        self.normal_keys = tuple(normal_keys)

    def apply_with_params(self, params, *args, **kwargs):
        res = super().apply_with_params(params, *args, **kwargs)
        for key in self.normal_keys:
            if res.get(key) is not None:
                n = res[key].copy()
                n[..., 0] *= -1.0
                res[key] = n
        return res


def _valid_key(task: str) -> str:
    return f"valid__{task}"


class JointTransform:
    """Resize/crop/flip an image and its dense labels together, jitter colours of the image only, normalise.

    Train: `resize_crop` resizes to `round(img_size * resize_ratio)` and takes a random `img_size` crop (the
    Taskonomy recipe: 224 crops of 256 images), `random_resized_crop` crops a random `scale` share of the image
    and resizes it (for PASCAL's varied image sizes); then a horizontal flip and colour jitter.
    Eval: a plain resize to `img_size`. Label maps always use nearest interpolation.

    Args:
        img_size: output side S.
        train: augment (True) or only resize (False).
        task_kinds: dense task name -> registry kind; tasks of kind "normal" get their x negated on flips.
        seed: fixes the augmentation sequence; by default each DataLoader worker reseeds from torch's per-worker
            seed so that workers do not repeat each other's augmentations.
    """

    def __init__(self, img_size: int, train: bool, task_kinds: Mapping[str, str], *, crop: str = "resize_crop",
                 resize_ratio: float = 256 / 224, scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.4, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, seed: int | None = None):
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        self.img_size, self.train = int(img_size), bool(train)
        self.task_kinds = dict(task_kinds)
        normal_keys = [t for t, k in self.task_kinds.items() if k == "normal"]
        size = (self.img_size, self.img_size)
        interp = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=LABEL_INTERPOLATION,
                      area_for_downscale="image")
        if not train:
            ops = [A.Resize(*size, **interp)]
        elif crop == "resize_crop":
            side = max(self.img_size, round(self.img_size * resize_ratio))
            ops = [A.Resize(side, side, **interp), A.RandomCrop(*size)]
        else:
            ops = [A.RandomResizedCrop(size, scale=scale, **interp)]
        if train and hflip > 0:
            ops.append(HorizontalFlipNormals(normal_keys, p=hflip))
        if train and color_jitter > 0:
            cj = color_jitter
            ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=min(0.5, cj / 4), p=0.8))
        ops.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
        targets = {t: "mask" for t in self.task_kinds} | {_valid_key(t): "mask" for t in self.task_kinds}
        self.pipeline = A.Compose(ops, additional_targets=targets, seed=seed)
        self.seed = seed
        self._worker_seed: int | None = None

    def _reseed_for_worker(self) -> None:
        """Give each DataLoader worker its own augmentation stream (forked copies would share one)."""
        info = torch.utils.data.get_worker_info()
        if info is None or info.seed == self._worker_seed:
            return
        self._worker_seed = info.seed
        self.pipeline.set_random_seed((info.seed if self.seed is None else self.seed * 1009 + info.id) % 2**32)

    def __call__(self, image: np.ndarray, labels: Mapping[str, np.ndarray], valid: Mapping[str, np.ndarray]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """image: uint8 [H, W, 3]; labels[t]: float [C, H, W] or [H, W]; valid[t]: bool [H, W].

        Returns image float32 [3, S, S] (normalised), labels[t] float32 [C, S, S] or [S, S] (same rank as given),
        valid[t] bool [S, S]. Only the tasks passed in are transformed (missing labels can be left out).
        """
        self._reseed_for_worker()
        data = {"image": image}
        for t, lab in labels.items():
            lab = np.asarray(lab, dtype=np.float32)
            data[t] = lab if lab.ndim == 2 else (lab[0] if lab.shape[0] == 1 else lab.transpose(1, 2, 0))
            data[_valid_key(t)] = np.asarray(valid[t], dtype=np.uint8)
        out = self.pipeline(**data)
        img = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        lab_out, valid_out = {}, {}
        for t, lab in labels.items():
            x = out[t]
            if lab.ndim == 3:
                x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
            lab_out[t] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            valid_out[t] = torch.from_numpy(out[_valid_key(t)] > 0)
        return img, lab_out, valid_out
