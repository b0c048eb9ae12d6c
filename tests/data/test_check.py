import numpy as np
import pytest

from modsquad.core.errors import DataError, UnknownNameError
from modsquad.data import check_dataset
from modsquad.data.io import write_image

from .conftest import SYNTH
from .pascal_fixture import TRAIN_IDS


def _first(root, domain, ext="png"):
    return sorted((root / domain).rglob(f"*.{ext}"))[0]


def test_clean_suite_is_ok(synth_root):
    report = check_dataset(synth_root)
    assert report.samples == SYNTH["images"] and report.ok_for()
    assert "class_scene" in report.tasks and "rgb" not in report.tasks
    assert all(r.found == SYNTH["images"] and r.usable == r.found for r in report.domains.values())


def test_lists_missing_unreadable_and_wrong_shaped_files(synth_copy):
    missing = _first(synth_copy, "depth_euclidean")
    missing.unlink()
    corrupt = _first(synth_copy, "normal")
    corrupt.write_bytes(b"not a png")
    small = _first(synth_copy, "reshading")
    write_image(small, np.zeros((8, 8), np.uint8))
    eight_bit = _first(synth_copy, "depth_zbuffer")
    write_image(eight_bit, np.zeros((32, 32), np.uint8))
    short = _first(synth_copy, "class_scene", "npy")
    np.save(short, np.ones(10, np.float32))

    report = check_dataset(synth_copy)
    d = report.domains
    assert d["depth_euclidean"].missing == ["synth000/point_0_view_0"]
    assert report.buildings_missing == {"synth000": ["depth_euclidean"]}
    assert len(d["normal"].unreadable) == 1 and str(corrupt) in d["normal"].unreadable[0]
    assert len(d["reshading"].wrong_shape) == 1 and "8x8, rgb is 32x32" in d["reshading"].wrong_shape[0]
    assert "stored as uint8" in d["depth_zbuffer"].wrong_shape[0]
    assert "10 classes" in d["class_scene"].wrong_shape[0]
    assert report.ok_for(["depth_euclidean", "edge_texture"])  # a missing label is masked, not fatal
    assert not report.ok_for(["normal"]) and not report.ok_for()
    with pytest.raises(DataError, match="normal: 1 unreadable"):
        report.raise_for(["normal", "depth_euclidean"])


def test_no_images_or_no_labels(tmp_path, synth_copy):
    report = check_dataset(tmp_path, tasks=["normal"])
    assert report.problems_for() == ["rgb: no usable files", "normal: no usable files (every sample lacks this "
                                     "label)"]
    import shutil

    shutil.rmtree(synth_copy / "normal")
    assert not check_dataset(synth_copy, tasks=["normal"]).ok_for()
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(tmp_path / "nowhere")
    with pytest.raises(UnknownNameError):
        check_dataset(synth_copy, tasks=["semseg"])


def test_pascal_context(pascal_copy):
    root, _ = pascal_copy
    report = check_dataset(root, "pascal-context")
    assert report.format == "pascal_context" and report.samples == 5 and report.ok_for()
    assert report.tasks == ["semseg", "human_parts", "sal", "normals", "edge"]
    (root / "normals_distill" / f"{TRAIN_IDS[0]}.png").write_bytes(b"junk")
    (root / "sal_distill" / f"{TRAIN_IDS[1]}.png").unlink()
    report = check_dataset(root, "pascal-context", tasks=["normals", "sal"])
    assert report.domains["sal"].missing == [TRAIN_IDS[1]]
    assert len(report.domains["normals"].unreadable) == 1
    assert report.ok_for(["sal"]) and not report.ok_for(["normals"])
