"""modsquad/predict.py (kept beside the extraction tests it shares fixtures with)."""

import cv2
import numpy as np
import pytest
import torch

from modsquad.errors import DataError, OutputPathError, UnknownNameError
from modsquad.extract.export import extract
from modsquad.predict import predict_images, preprocess, read_images, render
from modsquad.tasks import get_task

from .conftest import write_checkpoint


@pytest.fixture
def checkpoint(make_moe, images, tmp_path):
    return write_checkpoint(tmp_path / "run", make_moe("per_task"), images)


def _image(path, h, w, channels=3):
    rng = np.random.default_rng(0)
    shape = (h, w, channels) if channels > 1 else (h, w)
    assert cv2.imwrite(str(path), rng.integers(0, 255, shape, dtype=np.uint8))
    return path


def test_extracted_model_any_image_size(checkpoint, tmp_path):
    extract(checkpoint, tmp_path / "ext", tasks=["segment_semantic"], usage=checkpoint.parent, device="cpu")
    a = _image(tmp_path / "a.jpg", 45, 71)
    b = _image(tmp_path / "b.png", 20, 20, channels=1)
    paths = predict_images(tmp_path / "ext" / "segment_semantic", [a, b], out=tmp_path / "pred", device="cpu")
    assert [p.name for p in paths] == ["a_segment_semantic.png", "b_segment_semantic.png"]
    assert cv2.imread(str(paths[0])).shape == (45, 71, 3)
    assert cv2.imread(str(paths[1])).shape == (20, 20, 3)
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a_segment_semantic.png", "b_segment_semantic.png"]


def test_full_model_writes_next_to_the_image(checkpoint, tmp_path):
    a = _image(tmp_path / "a.png", 33, 40)
    paths = predict_images(checkpoint.parent, [a], tasks=["normal", "class_scene"], device="cpu")
    assert [p.name for p in paths] == ["a_normal.png", "a_class_scene.png"]
    assert all(p.parent == tmp_path for p in paths)
    assert cv2.imread(str(paths[0])).shape == (33, 40, 3)
    assert cv2.imread(str(paths[1])).shape == (64, 64, 3)  # top-5 class bar chart


def test_errors(checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = _image(tmp_path / "good.png", 32, 32)
    with pytest.raises(DataError, match="bad.png"):
        predict_images(checkpoint, [good, bad], out=tmp_path / "pred", device="cpu")
    with pytest.raises(DataError, match="missing.png"):
        predict_images(checkpoint, [tmp_path / "missing.png"], out=tmp_path / "pred", device="cpu")
    with pytest.raises(UnknownNameError, match="reshading"):
        predict_images(checkpoint, [good], out=tmp_path / "pred", tasks=["reshading"], device="cpu")
    assert not (tmp_path / "pred").exists()


def test_render_maps_back_to_image_size():
    spec = get_task("segment_semantic")
    logits = torch.zeros(18, 4, 4)
    logits[3, :, :2] = 1.0  # left half class 3, right half class 0
    rgb = render(spec, logits, (8, 12))
    assert rgb.shape == (8, 12, 3)
    assert (rgb[:, :6] == rgb[0, 0]).all() and (rgb[:, 6:] == rgb[0, -1]).all()
    assert render(get_task("depth_euclidean"), torch.rand(1, 4, 4), (9, 7)).shape == (9, 7, 3)
    x = preprocess(np.full((10, 30, 3), 255, np.uint8), (32, 32))
    assert x.shape == (3, 32, 32) and x.mean() > 2.0  # white, ImageNet-normalised


def test_float_images_are_read_at_their_own_scale(checkpoint, tmp_path):
    """A float32 TIFF in [0, 1] predicts like the same picture as 8-bit PNG (not divided by 255 again)."""
    rng = np.random.default_rng(3)
    rgb8 = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert cv2.imwrite(str(tmp_path / "p8.png"), rgb8)
    assert cv2.imwrite(str(tmp_path / "pf.tiff"), rgb8.astype(np.float32) / 255.0)
    a, b = read_images([tmp_path / "p8.png", tmp_path / "pf.tiff"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    paths = predict_images(checkpoint, [tmp_path / "p8.png", tmp_path / "pf.tiff"], out=tmp_path / "pred",
                           tasks=["depth_euclidean"], device="cpu")
    assert np.abs(cv2.imread(str(paths[0])).astype(int) - cv2.imread(str(paths[1])).astype(int)).max() <= 1


def test_outputs_never_overwrite_inputs_or_each_other(checkpoint, tmp_path):
    a = _image(tmp_path / "a.png", 32, 32)
    victim = _image(tmp_path / "a_normal.png", 32, 32)
    before = victim.read_bytes()
    with pytest.raises(OutputPathError, match="overwrite the input image"):
        predict_images(checkpoint, [a, victim], tasks=["normal"], device="cpu")
    assert victim.read_bytes() == before and not (tmp_path / "a_normal_normal.png").exists()
    (tmp_path / "b").mkdir()
    twin = _image(tmp_path / "b" / "a.png", 32, 32)
    with pytest.raises(OutputPathError, match="would both write"):
        predict_images(checkpoint, [a, twin], out=tmp_path / "pred", tasks=["normal"], device="cpu")
    assert not (tmp_path / "pred").exists()
    # next to each input (no --out) equal stems do not collide; a folder is read as its images, a repeat once
    c = tmp_path / "c"
    (c / "x").mkdir(parents=True)
    _image(c / "a.png", 32, 32)
    _image(c / "x" / "a.png", 32, 32)
    paths = predict_images(checkpoint, [c / "x", c / "a.png", c / "a.png"], tasks=["normal"], device="cpu")
    assert paths == [c / "x" / "a_normal.png", c / "a_normal.png"]
