"""tools/taskonomy_splits.py: official split table -> data/splits lists the Taskonomy loader reads."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from modsquad.data.io import write_image
from modsquad.data.taskonomy import TaskonomyDataset

_spec = importlib.util.spec_from_file_location(
    "taskonomy_splits", Path(__file__).resolve().parents[2] / "tools" / "taskonomy_splits.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.mark.parametrize("table", ["id,train,val,test\nalpha,1,0,0\nbeta,0,1,0\ngamma,0,0,1\ndelta,1,0,0\n",
                                   "alpha,1,0,0\nbeta,0,1,0\ngamma,0,0,1\ndelta,1,0,0\n",
                                   "building,split\nalpha,train\nbeta,val\ngamma,test\ndelta,train\n"])
def test_table_formats(tmp_path, table):
    (tmp_path / "t.csv").write_text(table)
    assert tool.read_split_table(tmp_path / "t.csv") == {"train": ["alpha", "delta"], "val": ["beta"],
                                                        "test": ["gamma"]}


def test_lists_feed_the_loader(tmp_path):
    (tmp_path / "t.csv").write_text("alpha,1,0,0\nbeta,0,1,0\n")
    tool.main([str(tmp_path / "t.csv"), "--set", "medium", "--out", str(tmp_path / "splits")])
    assert (tmp_path / "splits" / "taskonomy_medium_val.txt").read_text() == "beta\n"
    root = tmp_path / "root"
    for b in ("alpha", "beta"):
        write_image(root / "rgb" / b / "point_0_view_0_domain_rgb.png", np.zeros((8, 8, 3), np.uint8))
    ds = TaskonomyDataset(root, [], "val", 8, split_set="medium", splits_dir=tmp_path / "splits")
    assert [ds.sample_id(0)] == ["beta/point_0_view_0"]
