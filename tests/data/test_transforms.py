import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from modsquad.data.transforms import JointTransform

MEAN = np.array(IMAGENET_DEFAULT_MEAN)[:, None, None]
STD = np.array(IMAGENET_DEFAULT_STD)[:, None, None]


def _unnormalise(img: torch.Tensor) -> np.ndarray:
    return img.numpy() * STD + MEAN


def _inputs(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    normal = rng.normal(size=(3, h, w)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=0, keepdims=True)
    depth = rng.uniform(1, 5, (1, h, w)).astype(np.float32)
    seg = rng.choice([1, 5, 9], size=(h, w)).astype(np.float32)
    valid = np.ones((h, w), bool)
    valid[:, : w // 4] = False
    labels = {"normal": normal, "depth_euclidean": depth, "segment_semantic": seg}
    return image, labels, {k: valid for k in labels}


KINDS = {"normal": "normal", "depth_euclidean": "regression", "segment_semantic": "segmentation"}


def test_flip_negates_normal_x_only():
    image, labels, valid = _inputs()
    tf = JointTransform(32, True, KINDS, resize_ratio=1.0, hflip=1.0, color_jitter=0.0, seed=0)
    img, lab, val = tf(image, labels, valid)
    flipped = labels["normal"][:, :, ::-1]
    np.testing.assert_allclose(lab["normal"][0].numpy(), -flipped[0], atol=1e-6)
    np.testing.assert_allclose(lab["normal"][1:].numpy(), flipped[1:], atol=1e-6)
    np.testing.assert_allclose(lab["depth_euclidean"].numpy(), labels["depth_euclidean"][:, :, ::-1])
    np.testing.assert_array_equal(val["normal"].numpy(), valid["normal"][:, ::-1])
    np.testing.assert_allclose(_unnormalise(img), image[:, ::-1].transpose(2, 0, 1) / 255.0, atol=1e-5)


def test_colour_jitter_touches_rgb_only():
    image, labels, valid = _inputs()
    tf = JointTransform(32, True, KINDS, resize_ratio=1.0, hflip=0.0, color_jitter=0.8, seed=1)
    changed = 0
    for _ in range(5):
        img, lab, _ = tf(image, labels, valid)
        changed += not np.allclose(_unnormalise(img), image.transpose(2, 0, 1) / 255.0, atol=1e-3)
        for t in labels:
            np.testing.assert_array_equal(lab[t].numpy(), labels[t])
    assert changed > 0


def test_label_maps_use_nearest_interpolation():
    image, labels, valid = _inputs(40, 56)
    for train in (False, True):
        _, lab, val = JointTransform(24, train, KINDS, seed=2)(image, labels, valid)
        assert set(np.unique(lab["segment_semantic"].numpy())) <= {1.0, 5.0, 9.0}
        assert np.isin(lab["depth_euclidean"].numpy(), labels["depth_euclidean"]).all()
        assert lab["normal"].shape == (3, 24, 24) and val["normal"].dtype == torch.bool
        np.testing.assert_allclose(lab["normal"].norm(dim=0).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("crop", ["resize_crop", "random_resized_crop"])
def test_labels_stay_aligned_with_image(crop):
    """Image red channel and a label both encode the column index: crops, flips and resizes keep them equal."""
    h = w = 64
    cols = np.tile(np.repeat(np.arange(8), 8)[None], (h, 1))  # 8 px wide stripes
    image = np.stack([cols * 30, np.zeros_like(cols), np.zeros_like(cols)], -1).astype(np.uint8)
    label = {"depth_euclidean": (cols * 30.0)[None].astype(np.float32)}
    tf = JointTransform(32, True, {"depth_euclidean": "regression"}, crop=crop, color_jitter=0.0, seed=3)
    for _ in range(4):
        img, lab, _ = tf(image, label, {"depth_euclidean": np.ones((h, w), bool)})
        red, lab = _unnormalise(img)[0] * 255.0, lab["depth_euclidean"][0].numpy()
        err = np.abs(red - lab)
        assert np.median(err) < 1.0  # equal except on the (linearly interpolated) stripe borders of the rgb
        assert err.mean() < 0.2 * np.abs(red - lab[:, ::-1]).mean()


def test_bad_crop_mode():
    with pytest.raises(ValueError, match="crop"):
        JointTransform(32, True, {}, crop="zoom")


class _Repeat(torch.utils.data.Dataset):
    """The same input every time, so any difference between samples comes from the augmentation."""

    def __init__(self):
        self.tf = JointTransform(16, True, KINDS, resize_ratio=2.0, color_jitter=0.0)
        self.inputs = _inputs()

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.tf(*self.inputs)[1]["depth_euclidean"]


def test_dataloader_workers_draw_different_augmentations():
    batches = list(torch.utils.data.DataLoader(_Repeat(), batch_size=1, num_workers=2))
    assert not torch.equal(batches[0], batches[1])  # first sample of worker 0 vs first sample of worker 1
