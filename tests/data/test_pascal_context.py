import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modsquad.core.errors import DataError, UnknownNameError
from modsquad.data import PascalContextDataset, build_dataset
from modsquad.data.pascal_context import benchmark_normals_classes, label_boundaries, resolve_normals_classes
from modsquad.tasks.registry import IGNORE_INDEX

from .pascal_fixture import TRAIN_IDS, VAL_IDS


def test_reads_the_fixture_back(pascal_tree):
    root, truth = pascal_tree
    ds = build_dataset("pascal-context", root, ["semseg", "human_parts", "sal", "normals", "edge"], "train", 48,
                       train=False)
    assert len(ds) == len(TRAIN_IDS)
    for i in range(len(ds)):
        s = ds[i]
        exp = truth[s["id"]]
        t, m = s["targets"], s["masks"]
        np.testing.assert_array_equal(t["semseg"].numpy(), exp["semseg"])  # palette PNG (first id) read as indices
        np.testing.assert_array_equal(m["semseg"].numpy(), exp["semseg"] != 255)
        if exp["parts"] is not None:
            np.testing.assert_array_equal(t["human_parts"].numpy(), exp["parts"])
            assert m["human_parts"].all()
        else:  # no annotated person: ignored everywhere
            assert not m["human_parts"].any() and (t["human_parts"] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(t["sal"][0].numpy(), exp["sal"].astype(np.float32))
        n = exp["normals"] / np.linalg.norm(exp["normals"], axis=-1, keepdims=True)
        scored = np.isin(exp["label_map"], benchmark_normals_classes())  # default: the benchmark's class mask
        assert scored.any() and not scored.all()
        np.testing.assert_array_equal(m["normals"].numpy(), scored)
        np.testing.assert_allclose(t["normals"].numpy(), (n * scored[..., None]).transpose(2, 0, 1), atol=1e-6)
        np.testing.assert_array_equal(t["edge"][0].numpy(), label_boundaries(exp["label_map"]))
        assert t["edge"].sum() > 0
        jpeg = s["image"].numpy() * np.array([0.229, 0.224, 0.225])[:, None, None] + np.array(
            [0.485, 0.456, 0.406])[:, None, None]
        assert np.abs(jpeg * 255 - exp["rgb"].transpose(2, 0, 1)).mean() < 8  # JPEG is lossy


def test_label_boundaries():
    labels = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    np.testing.assert_array_equal(label_boundaries(labels), [[0, 1, 0], [1, 1, 1], [0, 0, 0]])


def test_val_split_training_mode_and_collate(pascal_tree):
    root, _ = pascal_tree
    ds = PascalContextDataset(root, split="val", img_size=32, train=True)
    assert len(ds) == len(VAL_IDS)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["targets"]["semseg"].shape == (2, 32, 32) and batch["targets"]["semseg"].dtype == torch.long
    assert batch["targets"]["normals"].shape == (2, 3, 32, 32) and batch["masks"]["sal"].shape == (2, 32, 32)
    assert set(batch["targets"]["semseg"].unique().tolist()) <= {0, 12, 15, IGNORE_INDEX}


def test_normals_valid_classes_mask_from_label_map(pascal_tree, tmp_path):
    root, truth = pascal_tree
    ds = PascalContextDataset(root, ["normals"], "train", 48, normals_valid_classes=[284])
    s = ds[0]
    np.testing.assert_array_equal(s["masks"]["normals"].numpy(), truth[s["id"]]["label_map"] == 284)
    everywhere = PascalContextDataset(root, ["normals"], "train", 48, normals_valid_classes="all")[0]
    assert everywhere["masks"]["normals"].all()
    ids = tmp_path / "ids.txt"
    ids.write_text("284\n45\n")
    assert resolve_normals_classes(str(ids)).tolist() == [284, 45]
    for bad, message in (("benchmarks", "neither benchmark nor all"), ([], "empty"), (["x"], "integers")):
        with pytest.raises(DataError, match=message):
            resolve_normals_classes(bad)


def test_shipped_benchmark_normals_classes():
    """170 Context ids: the Context classes that are NYU classes (not 'unknown') plus tvmonitor."""
    import json

    from modsquad.data.pascal_context import NORMALS_CLASSES_FILE

    table = json.loads(NORMALS_CLASSES_FILE.read_text())
    ids = benchmark_normals_classes()
    assert len(ids) == len(set(ids.tolist())) == 170 and len(table["names"]) == 170
    named = dict(zip(table["names"], table["ids"], strict=True))
    assert named["tvmonitor"] == 427 and named["person"] == 284 and named["wall"] == 440 and named["floor"] == 158
    assert "unknown" not in named and "sky" not in named  # 431 and 360: not scored


def test_missing_and_corrupt_files(pascal_copy, caplog):
    root, _ = pascal_copy
    (root / "sal_distill" / f"{TRAIN_IDS[1]}.png").unlink()
    (root / "human_parts" / f"{TRAIN_IDS[0]}.mat").write_bytes(b"MATLAB 5.0 garbage")
    ds = PascalContextDataset(root, ["sal", "human_parts"], "train", 48)
    assert ds.missing == {"sal": 1, "human_parts": 0}
    s = ds[1]
    assert not s["masks"]["sal"].any() and (s["targets"]["sal"] == 0).all()
    with pytest.raises(DataError, match=f"{TRAIN_IDS[0]}.mat"):
        ds[0]
    skip = PascalContextDataset(root, ["sal", "human_parts"], "train", 48, on_error="skip")
    with caplog.at_level(logging.WARNING):
        assert not skip[0]["masks"]["human_parts"].any()
    assert f"{TRAIN_IDS[0]}.mat" in caplog.text

    jpg = root / "JPEGImages" / f"{TRAIN_IDS[2]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-200])  # truncated JPEG (cv2 alone would decode half of it silently)
    with pytest.raises(DataError, match="truncated JPEG"):
        ds[2]
    assert skip[2]["id"] == TRAIN_IDS[0]


def test_bad_arguments(pascal_tree, tmp_path):
    root, _ = pascal_tree
    with pytest.raises(UnknownNameError, match="not PASCAL-Context tasks"):
        PascalContextDataset(root, ["depth_euclidean"])
    with pytest.raises(DataError, match="ImageSets/Context/test.txt"):
        PascalContextDataset(root, split="test")
    with pytest.raises(DataError, match="not found"):
        build_dataset("pascal_context", tmp_path, ["semseg"], "train", 32, False)


@pytest.mark.parametrize("value,expected", [("benchmark", "benchmark"), ("all", None)])
def test_config_key_reaches_the_dataset(pascal_tree, value, expected):
    """`data.normals_valid_classes` in a run config decides the dataset's normals mask (data.from_config)."""
    from modsquad.config import config_from_dict
    from modsquad.data.from_config import build_split

    cfg = config_from_dict({"model": {"name": "modsquad_vit_tiny", "tasks": ["normals"], "img_size": 32},
                            "data": {"format": "pascal_context", "root": str(pascal_tree[0]),
                                     "normals_valid_classes": value},
                            "train": {"steps": 1, "device": "cpu"}})
    data = build_split(cfg, "val", train=False)
    got = data.normals_valid_classes
    if expected is None:
        assert got is None
    else:
        assert np.array_equal(got, benchmark_normals_classes())
