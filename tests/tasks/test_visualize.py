import numpy as np
import pytest
import torch
from PIL import Image

from modsquad.tasks.registry import IGNORE_INDEX, TASKS, get_task
from modsquad.tasks.visualize import (
    LABEL_HEIGHT,
    MIN_TILE,
    colorize,
    colorize_labels,
    make_grid,
    output_meaning,
    prediction_panel,
    save_prediction_png,
    task_palette,
    voc_palette,
)

H, W = 12, 16


def _pred(name):
    spec = get_task(name)
    return torch.randn(spec.channels, H, W) if spec.is_dense else torch.randn(spec.channels)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_colorize_every_task(name):
    pred = _pred(name)
    out = colorize(name, pred)
    assert out.dtype == np.uint8
    assert out.shape == ((64, 64, 3) if name.startswith("class_") else (H, W, 3))
    assert np.array_equal(out, colorize(name, pred.clone()))  # deterministic


def test_colorize_accepts_numpy_and_tensor_alike():
    x = torch.randn(1, H, W)
    assert np.array_equal(colorize("depth_euclidean", x), colorize("depth_euclidean", x.numpy()))


def test_voc_palette_is_the_standard_and_deterministic():
    p = voc_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    assert p[0].tolist() == [0, 0, 0] and p[1].tolist() == [128, 0, 0] and p[2].tolist() == [0, 128, 0]
    assert p[15].tolist() == [192, 128, 128]  # VOC "person"
    assert np.array_equal(p, voc_palette())
    labels = np.array([[0, 1], [15, IGNORE_INDEX]])
    assert colorize_labels(labels)[1, 0].tolist() == [192, 128, 128]


def test_segmentation_logits_and_labels_agree():
    labels = torch.randint(1, 18, (H, W))  # 0 ("uncertain") is never a label
    logits = torch.nn.functional.one_hot(labels, 18).permute(2, 0, 1).float() * 5
    assert np.array_equal(colorize("segment_semantic", logits), colorize("segment_semantic", labels))


def test_normals_and_masks():
    up = torch.zeros(3, 2, 2)
    up[2] = 1.0
    out = colorize("normal", up, mask=torch.tensor([[True, True], [True, False]]))
    assert out[0, 0].tolist() == [128, 128, 255] and out[1, 1].tolist() == [0, 0, 0]


def test_depth_uses_given_range_and_blacks_out_invalid():
    depth = torch.linspace(0, 10, H * W).view(1, H, W)
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[0, 0] = False
    out = colorize("depth_euclidean", depth, mask=mask, value_range=(0.0, 10.0))
    assert out[0, 0].tolist() == [0, 0, 0] and not np.array_equal(out[0, 1], out[-1, -1])


def test_saliency_logits_vs_probabilities():
    zero_logits = torch.zeros(1, H, W)
    assert colorize("sal", zero_logits, logits=True)[0, 0].tolist() == [128, 128, 128]  # sigmoid(0) = .5
    assert colorize("sal", torch.ones(1, H, W))[0, 0].tolist() == [255, 255, 255]  # target in {0, 1}


def test_make_grid_layout():
    tasks = ["depth_euclidean", "segment_semantic", "class_object"]
    image = torch.rand(3, H, W)
    preds = {t: _pred(t) for t in tasks}
    targets = {"depth_euclidean": torch.rand(1, H, W), "segment_semantic": torch.randint(0, 18, (H, W))}
    grid = make_grid(image, preds, targets, masks={"depth_euclidean": torch.rand(H, W) > 0.5}, pad=2, min_tile=1)
    assert grid.dtype == np.uint8
    # column headers (input | prediction | target), then per task a name strip and a row of tiles
    assert grid.shape == (LABEL_HEIGHT + 3 * (H + LABEL_HEIGHT) + 2 * 2, 3 * W + 2 * 2, 3)
    no_targets = make_grid(image, preds, labels=False, pad=2, min_tile=1)
    assert no_targets.shape == (3 * H + 2 * 2, 2 * W + 2, 3)


def test_make_grid_upscales_small_inputs_to_be_readable():
    image = torch.rand(3, H, W)
    grid = make_grid(image, {"normal": torch.randn(3, H, W)}, {"normal": torch.randn(3, H, W)}, labels=False, pad=0)
    f = -(-MIN_TILE // H)  # smallest integer factor making the short side >= MIN_TILE
    assert grid.shape == (H * f, 3 * W * f, 3)
    assert (grid[:f, :f] == grid[0, 0]).all()  # nearest: each pixel becomes an f x f block


def test_segment_semantic_background_is_not_aeroplane_maroon():
    palette = task_palette("segment_semantic")
    assert palette[1].tolist() == [0, 0, 0] and palette[2].tolist() == [128, 0, 0]
    assert np.array_equal(task_palette("semseg"), voc_palette())
    assert colorize("segment_semantic", torch.ones(H, W, dtype=torch.long))[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", ["depth_euclidean", "segment_semantic", "normal", "sal", "class_scene",
                                  "principal_curvature", "edge_texture"])
def test_prediction_panel_has_input_prediction_and_a_key(name):
    spec = get_task(name)
    image = np.zeros((40, 90, 3), np.uint8)
    pred = torch.randn(spec.channels, 40, 90) if spec.is_dense else torch.randn(spec.channels)
    panel = prediction_panel(image, name, pred, title="x")
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[1] > panel.shape[0]


def test_output_meaning_names_units_and_classes():
    assert output_meaning("depth_euclidean")["units"] == "m"
    seg = output_meaning("segment_semantic")
    assert len(seg["class_names"]) == 18 and seg["class_names"][1] == "background"
    assert len(output_meaning("semseg")["class_names"]) == 21 and len(output_meaning("human_parts")["class_names"]) == 7
    assert output_meaning("class_scene")["layout"] == "[batch, classes]"
    for name in TASKS:
        meaning = output_meaning(name)
        assert meaning["task"] == name and "quantity" in meaning and "units" in meaning


def test_save_prediction_png_round_trip(tmp_path):
    img = colorize("normal", torch.randn(3, H, W))
    path = save_prediction_png(tmp_path / "a" / "b.png", img)
    assert np.array_equal(np.asarray(Image.open(path)), img)
    with pytest.raises(ValueError):
        save_prediction_png(tmp_path / "c.png", img.astype(np.float32))


@pytest.mark.parametrize("name", ["class_object", "class_scene"])
def test_classification_targets_with_their_per_sample_mask(name):
    """The loader's class mask is one bool per sample; drawing a class target with it must not reshape it."""
    spec = get_task(name)
    target = torch.softmax(torch.randn(spec.channels), 0)
    drawn = colorize(name, target, mask=torch.tensor(True), logits=False)
    assert drawn.shape == (64, 64, 3) and (drawn != 255).any()
    assert not colorize(name, target, mask=torch.tensor(False)).any()  # unlabelled image: black
    image = torch.rand(3, H, W)
    grid = make_grid(image, {name: torch.randn(spec.channels)}, {name: target}, {name: torch.tensor(True)},
                     min_tile=1)
    assert grid.shape == (LABEL_HEIGHT + H + LABEL_HEIGHT, 3 * W + 2 * 2, 3)


def test_prediction_panel_shows_no_negative_metres_and_survives_a_constant_map():
    image = np.zeros((16, 16, 3), np.uint8)
    near = torch.full((1, 16, 16), 0.0)
    below = near.clone()
    below[0, :4] = -1.5  # a head's overshoot below 0 m is drawn as 0 m, as --raw writes it
    assert np.array_equal(prediction_panel(image, "depth_euclidean", below),
                          prediction_panel(image, "depth_euclidean", near))
    flat = prediction_panel(image, "keypoints2d", torch.full((1, 16, 16), 0.3))
    assert flat.ndim == 3 and flat.shape[2] == 3
