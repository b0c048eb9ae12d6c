"""modsquad/predict.py (kept beside the extraction tests it shares fixtures with)."""

import cv2
import numpy as np
import pytest
import torch

from modsquad.core.errors import DataError, OutputPathError, UnknownNameError
from modsquad.extract.export import write_extracted
from modsquad.predict import ModelInput, fit_size, predict_images, preprocess, read_images, render
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
    write_extracted(checkpoint, tmp_path / "ext", tasks=["segment_semantic"], usage=checkpoint.parent, device="cpu")
    a = _image(tmp_path / "a.jpg", 45, 71)
    b = _image(tmp_path / "b.png", 20, 20, channels=1)
    # the weights file of an extracted model is accepted in place of its folder
    result = predict_images(tmp_path / "ext" / "segment_semantic" / "model.safetensors", [a, b],
                            out=tmp_path / "pred", device="cpu", raw=True)
    names = [p.name for p in result.written]
    assert names == ["a_segment_semantic.png", "a_segment_semantic_raw.png", "b_segment_semantic.png",
                     "b_segment_semantic_raw.png"]
    assert result.skipped == {}
    panel = cv2.imread(str(result.written[0]))
    assert panel.shape[0] > 45 and panel.shape[1] > 2 * 71  # input | prediction + legend
    ids = cv2.imread(str(result.written[1]), cv2.IMREAD_UNCHANGED)
    assert ids.shape == (45, 71) and ids.dtype == np.uint8 and ids.max() < 18
    assert cv2.imread(str(result.written[3]), cv2.IMREAD_UNCHANGED).shape == (20, 20)
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(names)


def test_full_model_writes_next_to_the_image(checkpoint, tmp_path):
    a = _image(tmp_path / "a.png", 33, 40)
    result = predict_images(checkpoint.parent, [a], tasks=["normal", "class_scene", "depth_euclidean"],
                            device="cpu", raw=True)
    assert [p.name for p in result.written] == ["a_normal.png", "a_normal_raw.png", "a_class_scene.png",
                                                "a_class_scene_raw.npy", "a_depth_euclidean.png",
                                                "a_depth_euclidean_raw.png"]
    assert all(p.parent == tmp_path for p in result.written)
    normal = cv2.imread(str(result.written[1]), cv2.IMREAD_UNCHANGED)
    assert normal.shape == (33, 40, 3) and normal.dtype == np.uint8  # Taskonomy 8-bit encoding
    probs = np.load(result.written[3])
    assert probs.shape == (365,) and abs(probs.sum() - 1) < 1e-4
    depth = cv2.imread(str(result.written[5]), cv2.IMREAD_UNCHANGED)
    assert depth.shape == (33, 40) and depth.dtype == np.uint16  # 1/512 m


def test_folders_globs_and_unreadable_files_are_skipped_and_reported(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    _image(photos / "x.png", 32, 48)
    _image(photos / "y.jpg", 40, 32)
    (photos / "broken.png").write_text("not an image")
    (tmp_path / "shots").mkdir()
    _image(tmp_path / "shots" / "s1.png", 32, 32)
    result = predict_images(checkpoint, [photos, str(tmp_path / "shots" / "*.png"), tmp_path / "missing.png",
                                         str(tmp_path / "none" / "*.jpg")],
                            out=tmp_path / "pred", tasks=["depth_euclidean"], device="cpu")
    assert sorted(p.name for p in result.written) == ["s1_depth_euclidean.png", "x_depth_euclidean.png",
                                                      "y_depth_euclidean.png"]
    assert set(result.skipped) == {str(photos / "broken.png"), str(tmp_path / "missing.png"),
                                   str(tmp_path / "none" / "*.jpg")}
    assert "not a valid" in result.skipped[str(photos / "broken.png")]
    assert result.skipped[str(tmp_path / "missing.png")] == "not found"
    with pytest.raises(DataError, match="nothing could be predicted.*broken.png"):  # nothing at all: an error
        predict_images(checkpoint, [photos / "broken.png"], out=tmp_path / "pred2", device="cpu")
    assert not (tmp_path / "pred2").exists()


def test_errors(checkpoint, tmp_path):
    good = _image(tmp_path / "good.png", 32, 32)
    with pytest.raises(DataError, match="missing.png"):
        predict_images(checkpoint, [tmp_path / "missing.png"], out=tmp_path / "pred", device="cpu")
    with pytest.raises(UnknownNameError, match="reshading"):
        predict_images(checkpoint, [good], out=tmp_path / "pred", tasks=["reshading"], device="cpu")
    assert not (tmp_path / "pred").exists()


def test_aspect_ratio_is_kept():
    model = ModelInput((64, 64), 16)
    assert fit_size(277, 900, model) == (64, 208, 64, 208)  # short side 64, long 900 * 64 / 277
    assert fit_size(100, 1000, model) == (26, 256, 32, 256)  # long side capped at 4x the short one
    assert fit_size(50, 45, model) == (71, 64, 80, 64)  # padded to the patch grid
    x, inner = preprocess(np.full((10, 30, 3), 255, np.uint8), model)
    assert x.shape == (3, 64, 192) and inner == (64, 192) and x.mean() > 2.0  # white, ImageNet-normalised
    x, inner = preprocess(np.full((50, 45, 3), 255, np.uint8), model)
    assert inner == (71, 64) and x.shape == (3, 80, 64) and (x[:, 71:] == 0).all()  # padded with the mean


def test_render_maps_back_to_image_size():
    spec = get_task("segment_semantic")
    logits = torch.zeros(18, 4, 4)
    logits[3, :, :2] = 1.0
    panel = render(spec, logits, (8, 12))
    assert panel.dtype == np.uint8 and panel.ndim == 3
    assert render(get_task("depth_euclidean"), torch.rand(1, 4, 4), (9, 7)).ndim == 3


def test_float_images_are_read_at_their_own_scale(checkpoint, tmp_path):
    """A float32 TIFF in [0, 1] predicts like the same picture as 8-bit PNG (not divided by 255 again)."""
    rng = np.random.default_rng(3)
    rgb8 = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert cv2.imwrite(str(tmp_path / "p8.png"), rgb8)
    assert cv2.imwrite(str(tmp_path / "pf.tiff"), rgb8.astype(np.float32) / 255.0)
    a, b = read_images([tmp_path / "p8.png", tmp_path / "pf.tiff"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    result = predict_images(checkpoint, [tmp_path / "p8.png", tmp_path / "pf.tiff"], out=tmp_path / "pred",
                            tasks=["depth_euclidean"], device="cpu", raw=True)
    raw = [p for p in result.written if p.suffix == ".png" and "_raw" in p.name]
    first, second = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(int) for p in raw)
    assert np.abs(first - second).max() <= 1


def test_outputs_never_overwrite_inputs_or_each_other(checkpoint, tmp_path):
    a = _image(tmp_path / "a.png", 32, 32)
    victim = _image(tmp_path / "a_normal.png", 32, 32)
    before = victim.read_bytes()
    with pytest.raises(OutputPathError, match="overwrite the input image"):
        predict_images(checkpoint, [a, victim], tasks=["normal"], device="cpu")
    assert victim.read_bytes() == before and not (tmp_path / "a_normal_normal.png").exists()
    raw_victim = _image(tmp_path / "b_normal_raw.png", 32, 32)
    b = _image(tmp_path / "b.png", 32, 32)
    with pytest.raises(OutputPathError, match="overwrite the input image"):
        predict_images(checkpoint, [b, raw_victim], tasks=["normal"], device="cpu", raw=True)
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
    result = predict_images(checkpoint, [c / "x", c / "a.png", c / "a.png"], tasks=["normal"], device="cpu")
    assert result.written == [c / "x" / "a_normal.png", c / "a_normal.png"]


def test_a_second_run_over_a_folder_leaves_the_first_runs_predictions_out(checkpoint, tmp_path):
    from modsquad.predict import is_prediction

    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "a.jpg", 32, 40)
    first = predict_images(checkpoint, [folder], tasks=["normal", "depth_euclidean"], device="cpu", raw=True)
    pngs = [p for p in first.written if p.suffix == ".png"]
    assert pngs and all(is_prediction(p) for p in pngs)
    assert cv2.imread(str(pngs[0])) is not None  # the marked PNG still decodes everywhere
    assert not is_prediction(folder / "a.jpg")
    again = predict_images(checkpoint, [folder, str(folder / "*.png")], tasks=["normal", "depth_euclidean"],
                           device="cpu", raw=True)
    assert again.written == first.written  # replaced, not taken as inputs
    named = predict_images(checkpoint, [folder / "a.jpg", pngs[0]], tasks=["normal"], device="cpu")
    assert "modsquad predict" in named.skipped[str(pngs[0])]


def test_photos_are_turned_as_their_exif_orientation_says(checkpoint, tmp_path):
    from PIL import Image

    im = Image.new("RGB", (48, 32), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    im.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    (image,) = read_images([tmp_path / "phone.jpg"])
    assert image.shape[:2] == (48, 32)
    result = predict_images(checkpoint, [tmp_path / "phone.jpg"], tasks=["depth_euclidean"], device="cpu", raw=True)
    assert cv2.imread(str(result.written[1]), cv2.IMREAD_UNCHANGED).shape[:2] == (48, 32)
