"""The loaders decode files written from the published Taskonomy specifications exactly as the official loaders
mean them (pixel by pixel), in both published layouts; `data check` accepts them and flags bad class vectors."""

import numpy as np
import pytest
import torch

from modsquad.data import check_dataset
from modsquad.data.taskonomy import TaskonomyDataset, taskonomy_tasks
from modsquad.tasks.registry import IGNORE_INDEX

from .real_format import LAYOUTS, TRAIN_BUILDINGS, VIEWS, file_path, make_taskonomy_tree

SIZE = 32


@pytest.fixture(scope="module", params=LAYOUTS)
def tree(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"taskonomy_{request.param}")
    return root, request.param, make_taskonomy_tree(root, request.param, size=SIZE)


def test_every_domain_decodes_as_specified(tree):
    root, _, truth = tree
    tasks = taskonomy_tasks()
    ds = TaskonomyDataset(root, tasks, split="train", img_size=SIZE)  # buildings from the shipped tiny split
    assert ds.buildings == list(TRAIN_BUILDINGS) and len(ds) == len(TRAIN_BUILDINGS) * len(VIEWS)
    assert ds.missing == dict.fromkeys(tasks, 0)
    for i in range(len(ds)):
        sample = ds[i]
        b, p, v = ds.samples[i]
        assert sample["id"] == f"{b}/point_{p}_view_{v}"
        expected = truth[(b, p, v)]["expected"]
        for task in tasks:
            target, valid = expected[task]
            got, mask = sample["targets"][task].numpy(), sample["masks"][task].numpy()
            np.testing.assert_array_equal(mask, valid, err_msg=task)
            if task == "segment_semantic":
                np.testing.assert_array_equal(got, np.where(valid, target, IGNORE_INDEX), err_msg=task)
            else:
                np.testing.assert_allclose(got, target, rtol=1e-5, atol=1e-6, err_msg=task)


def test_invalid_codes_are_masked(tree):
    """The no-mesh depth range, grey-128 normals, zero curvature and mask_valid all reach the masks."""
    root, _, truth = tree
    tasks = ["depth_zbuffer", "normal", "principal_curvature", "reshading", "edge_occlusion", "edge_texture"]
    ds = TaskonomyDataset(root, tasks, split="train", img_size=SIZE)
    s, q = ds[0], SIZE // 4
    stored = truth[ds.samples[0]]["stored"]
    assert (stored["depth_zbuffer"][:q, -q:] < 65535).all()  # 64500..65534, not only 65535
    for task in ("depth_zbuffer", "normal", "principal_curvature", "reshading", "edge_occlusion"):
        m = s["masks"][task]
        assert not m[:q, :q].any() and not m[:q, -q:].any(), task  # depth 65535 and >= 64500: no mesh
        assert not m[-q:, :q].any(), task  # mask_valid = 0
    assert not s["masks"]["normal"][q:2 * q, q:2 * q].any()  # grey 128
    assert not s["masks"]["principal_curvature"][-q:, -q:].any()  # 0 = no geometry
    assert s["masks"]["edge_texture"].all()  # a 2-D domain: no mesh needed
    off = TaskonomyDataset(root, tasks, split="train", img_size=SIZE, mask_no_mesh=False)[0]
    assert off["masks"]["normal"][-q:, :q].all()  # only the file's own invalid codes


def test_class_vectors(tree):
    root, _, truth = tree
    ds = TaskonomyDataset(root, ["class_object", "class_scene"], split="train", img_size=SIZE)
    s = ds[0]
    logits = torch.from_numpy(truth[ds.samples[0]]["stored"]["class_object"])
    torch.testing.assert_close(s["targets"]["class_object"], torch.softmax(logits.double(), 0).float())
    assert (s["targets"]["class_object"] > 0).all() and s["masks"]["class_object"]
    torch.testing.assert_close(s["targets"]["class_scene"].sum(), torch.tensor(1.0))


def test_data_check_accepts_the_real_formats_and_flags_bad_class_vectors(tree, tmp_path):
    import shutil

    root, layout, _ = tree
    report = check_dataset(root, "taskonomy", split="train")
    assert report.ok_for() and report.samples == len(TRAIN_BUILDINGS) * len(VIEWS), report.problems_for()
    copy = shutil.copytree(root, tmp_path / "copy")
    b, (p, v) = TRAIN_BUILDINGS[0], VIEWS[0]
    np.save(file_path(copy, layout, "class_object", b, p, v, "npy"), np.full(1000, 0.5, np.float32))
    np.save(file_path(copy, layout, "class_scene", b, p, v, "npy"), -np.ones(365, np.float32))
    report = check_dataset(copy, "taskonomy", split="train")
    assert "neither logits" in report.domains["class_object"].unreadable[0]
    assert "negative entries" in report.domains["class_scene"].unreadable[0]
    assert not report.ok_for(["class_object"]) and report.ok_for(["normal"])
