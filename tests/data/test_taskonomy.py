import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modsquad.core.errors import DataError, UnknownNameError
from modsquad.data import build_dataset, render_sample
from modsquad.data import synthetic as syn
from modsquad.data.io import write_image
from modsquad.data.taskonomy import SPLITS_DIR, TaskonomyDataset, read_split_file
from modsquad.tasks.registry import IGNORE_INDEX

from .conftest import SYNTH

ALL = [d for d in syn.DOMAINS if d != "rgb"]
MEAN = np.array([0.485, 0.456, 0.406])[:, None, None]
STD = np.array([0.229, 0.224, 0.225])[:, None, None]
# decoded value vs rendered float: half a quantisation step of each file format (normals renormalised after)
TOL = {"depth_euclidean": 0.5 / 512 + 1e-6, "depth_zbuffer": 0.5 / 512 + 1e-6, "normal": 1.5 / 127,
       "principal_curvature": 0.5 / 127 + 1e-6, "reshading": 0.5 / 255 + 1e-6, "segment_unsup2d": 1e-6,
       "segment_unsup25d": 1e-6, "edge_occlusion": 0.5 / 65535 + 1e-6, "edge_texture": 0.5 / 65535 + 1e-6,
       "keypoints2d": 0.5 / 65535 + 1e-6, "keypoints3d": 0.5 / 65535 + 1e-6, "class_object": 1e-6,
       "class_scene": 1e-6}


def _write(root, domain, building, p, v, arr, nested=False):
    ext = "npy" if domain.startswith("class_") else "png"
    folder = root / domain / ("taskonomy" if nested else "") / building
    path = folder / f"point_{p}_view_{v}_domain_{domain}.{ext}"
    if ext == "npy":
        folder.mkdir(parents=True, exist_ok=True)
        np.save(path, arr)
    else:
        write_image(path, arr)
    return path


def _hand_made_root(root, nested=False):
    """One 8 x 8 sample with known stored values in every codec."""
    rgb = np.full((8, 8, 3), 100, np.uint8)
    depth = np.full((8, 8), 512, np.uint16)
    depth[:, 4:] = 1280
    depth[0, 0] = 65535
    normal = np.full((8, 8, 3), (127, 127, 254), np.uint8)
    normal[4:] = (254, 127, 127)
    curv = np.full((8, 8, 3), (254, 0, 127), np.uint8)
    shading = np.full((8, 8), 255, np.uint8)
    edge = np.zeros((8, 8), np.uint16)
    edge[2] = 65535
    seg = np.ones((8, 8), np.uint8)
    seg[0] = 0
    seg[7] = 17
    cls = np.full(1000, -30.0, np.float32)  # logits, as the real class_object files
    cls[[3, 999]] = 2.0
    for dom, arr in [("rgb", rgb), ("depth_euclidean", depth), ("normal", normal), ("principal_curvature", curv),
                     ("reshading", shading), ("edge_texture", edge), ("segment_semantic", seg),
                     ("class_object", cls)]:
        _write(root, dom, "bldg", 0, 0, arr, nested)
    return root


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "omnidata"])
def test_decoding_scales_and_invalid_masks(tmp_path, nested):
    tasks = ["depth_euclidean", "normal", "principal_curvature", "reshading", "edge_texture", "segment_semantic",
             "class_object"]
    ds = TaskonomyDataset(_hand_made_root(tmp_path, nested), tasks, split=None, img_size=8)
    s = ds[0]
    t, m = s["targets"], s["masks"]
    assert s["id"] == "bldg/point_0_view_0"
    depth = t["depth_euclidean"][0]
    assert depth[1, 0] == 1.0 and depth[1, 5] == 2.5
    assert depth[0, 0] == 0 and not m["depth_euclidean"][0, 0] and m["depth_euclidean"].sum() == 63
    # depth 65535 at (0, 0): no mesh, so normal and curvature are masked there too (shared validity mask)
    assert not m["normal"][0, 0] and not m["principal_curvature"][0, 0] and m["normal"].sum() == 63
    torch.testing.assert_close(t["normal"][:, 1, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(t["normal"][:, 5, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(t["principal_curvature"][:, 3, 3], torch.tensor([1.0, -1.0]))
    assert t["reshading"].shape == (3, 8, 8) and (t["reshading"][m["reshading"].expand(3, 8, 8)] == 1.0).all()
    assert not m["reshading"][0, 0] and t["reshading"][:, 0, 0].eq(0).all()
    assert (t["edge_texture"][0, 2] == 1.0).all() and t["edge_texture"].sum() == 8
    seg = t["segment_semantic"]
    assert seg.dtype == torch.long and (seg[0] == IGNORE_INDEX).all() and (seg[7] == 17).all()
    assert not m["segment_semantic"][0].any() and m["segment_semantic"][1:].all()
    torch.testing.assert_close(t["class_object"][[3, 999]], torch.tensor([0.5, 0.5]))  # softmax of the logits
    assert m["class_object"].item()
    np.testing.assert_allclose(s["image"].numpy() * STD + MEAN, 100 / 255, atol=1e-6)


def test_pairs_by_point_and_view_and_masks_missing_labels(tmp_path, caplog):
    for p in (0, 1, 2):
        _write(tmp_path, "rgb", "b1", p, 0, np.full((8, 8, 3), 50 * p, np.uint8))
    _write(tmp_path, "rgb", "b0", 7, 3, np.zeros((8, 8, 3), np.uint8))
    for p in (2, 0):  # written out of order, point 1 missing
        _write(tmp_path, "depth_zbuffer", "b1", p, 0, np.full((8, 8), 512 * (p + 1), np.uint16))
    _write(tmp_path, "depth_zbuffer", "b0", 7, 3, np.full((8, 8), 512 * 9, np.uint16))
    with caplog.at_level(logging.WARNING):
        ds = TaskonomyDataset(tmp_path, ["depth_zbuffer"], split=None, img_size=8, buildings=["b1", "b0"])
    assert "b1 (depth_zbuffer 1)" in caplog.text
    assert [ds.sample_id(i) for i in range(len(ds))] == ["b1/point_0_view_0", "b1/point_1_view_0",
                                                         "b1/point_2_view_0", "b0/point_7_view_3"]
    assert ds.missing == {"depth_zbuffer": 1} and ds.buildings_missing == {"b1": {"depth_zbuffer": 1}}
    batch = next(iter(DataLoader(ds, batch_size=4)))
    depth, mask = batch["targets"]["depth_zbuffer"], batch["masks"]["depth_zbuffer"]
    assert depth[:, 0, 0, 0].tolist() == [1.0, 0.0, 3.0, 9.0]
    assert mask.flatten(1).all(1).tolist() == [True, False, True, True]
    assert not mask[1].any()


def test_round_trip_synthetic(synth_root):
    """synthesise -> load -> the decoded values equal what was rendered (within the file formats' precision)."""
    for split in ("train", "val", "test"):
        ds = build_dataset("synthetic", synth_root, ALL, split, SYNTH["size"], train=False)
        for i in (0, len(ds) - 1):
            s = ds[i]
            b, p, v = ds.samples[i]
            ref = render_sample(SYNTH["seed"], int(b.removeprefix("synth")), p, v, SYNTH["size"])
            np.testing.assert_allclose(s["image"].numpy() * STD + MEAN, ref["rgb"], atol=0.5 / 255 + 1e-5)
            valid = ref["valid"]
            for task in ALL:
                got, exp = s["targets"][task].numpy(), ref[task]
                if task == "segment_semantic":
                    np.testing.assert_array_equal(got, exp)
                    np.testing.assert_array_equal(s["masks"][task].numpy(), exp != IGNORE_INDEX)
                elif task.startswith("class_"):
                    np.testing.assert_allclose(got, exp, atol=TOL[task])
                else:
                    np.testing.assert_allclose(got[..., valid], exp[..., valid], atol=TOL[task], err_msg=task)
            for task in ("depth_euclidean", "depth_zbuffer", "normal"):
                np.testing.assert_array_equal(s["masks"][task].numpy(), valid)


def test_synthetic_splits_are_disjoint(synth_root):
    seen = {}
    for split in ("train", "val", "test"):
        ds = build_dataset("synthetic", synth_root, ["normal"], split, 32, train=False)
        seen[split] = {i.split("/")[0] for i in (ds.sample_id(k) for k in range(len(ds)))}
        assert seen[split] == set(read_split_file(synth_root / "splits" / f"{split}.txt"))
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert sum(len(build_dataset("synthetic", synth_root, ["normal"], s, 32, False)) for s in seen) == 18


def test_shipped_tiny_split_is_disjoint():
    lists = {s: read_split_file(SPLITS_DIR / f"taskonomy_tiny_{s}.txt") for s in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [25, 5, 5]
    assert len(set(sum(lists.values(), []))) == 35


def test_split_lookup(tmp_path):
    _hand_made_root(tmp_path)
    with pytest.raises(DataError, match="none of the 5 buildings of split 'val'"):
        TaskonomyDataset(tmp_path, ["normal"], split="val", img_size=8)  # falls back to the shipped tiny lists
    with pytest.raises(DataError, match="taskonomy_medium_val.txt"):
        TaskonomyDataset(tmp_path, ["normal"], split="val", img_size=8, split_set="medium")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("# mine\nbldg\n")
    assert len(TaskonomyDataset(tmp_path, ["normal"], split="val", img_size=8)) == 1


def test_corrupt_files_raise_naming_the_file_or_are_skipped(synth_copy, caplog):
    ds = build_dataset("synthetic", synth_copy, ["normal", "depth_euclidean"], "val", 32, train=False)
    bad = ds.paths["normal"][ds.samples[0]]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=str(bad)):
        ds[0]
    skip = build_dataset("synthetic", synth_copy, ["normal", "depth_euclidean"], "val", 32, False, on_error="skip")
    with caplog.at_level(logging.WARNING):
        s = skip[0]
    assert str(bad) in caplog.text
    assert not s["masks"]["normal"].any() and (s["targets"]["normal"] == 0).all()
    assert s["masks"]["depth_euclidean"].any()

    rgb = ds.paths["rgb"][ds.samples[1]]
    rgb.write_bytes(rgb.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=str(rgb)):
        ds[1]
    assert skip[1]["id"] == skip.sample_id(2)  # moves on to the next sample
    assert skip.skipped == 1


def test_wrong_shape_and_missing_domain(synth_copy):
    ds = build_dataset("synthetic", synth_copy, ["reshading"], "test", 32, train=False)
    write_image(ds.paths["reshading"][ds.samples[0]], np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match="wrong shape .*16x16, rgb is 32x32"):
        ds[0]
    import shutil

    shutil.rmtree(synth_copy / "keypoints3d")
    with pytest.raises(DataError, match="no keypoints3d files"):
        build_dataset("synthetic", synth_copy, ["keypoints3d"], "test", 32, train=False)
    ds = build_dataset("synthetic", synth_copy, ["keypoints3d"], "test", 32, train=False, on_error="skip")
    assert ds.missing["keypoints3d"] == len(ds) and not ds[0]["masks"]["keypoints3d"].any()


def test_unknown_tasks_and_roots(synth_root, tmp_path):
    with pytest.raises(UnknownNameError, match="not a Taskonomy domain"):
        build_dataset("synthetic", synth_root, ["semseg"], "train", 32, False)
    with pytest.raises(UnknownNameError, match="unknown task"):
        build_dataset("synthetic", synth_root, ["depth"], "train", 32, False)
    with pytest.raises(DataError, match="modsquad data synth"):
        build_dataset("synthetic", tmp_path, ["normal"], "train", 32, False)
    with pytest.raises(DataError, match="no rgb images"):
        build_dataset("taskonomy", tmp_path, ["normal"], "train", 32, False)
    with pytest.raises(UnknownNameError, match="format"):
        build_dataset("nyu", tmp_path, ["normal"], "train", 32, False)


def test_max_images_and_training_batches(synth_root):
    ds = build_dataset("synthetic", synth_root, ALL, "all", 24, train=True, max_images=4)
    assert len(ds) == 4 and len({ds.samples[i][0] for i in range(4)}) == 3  # spread over all 3 buildings
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, 24, 24)
    assert batch["targets"]["normal"].shape == (4, 3, 24, 24) and batch["masks"]["normal"].shape == (4, 24, 24)
    assert batch["targets"]["segment_semantic"].dtype == torch.long
    assert batch["targets"]["class_scene"].shape == (4, 365) and batch["masks"]["class_scene"].shape == (4,)
    n = batch["targets"]["normal"]
    valid = batch["masks"]["normal"]
    torch.testing.assert_close(n.norm(dim=1)[valid], torch.ones(int(valid.sum())), atol=1e-4, rtol=0)
