"""Shared fixtures of the data tests: a tiny synthetic suite and a fake PASCAL-Context tree, made once per session."""

from __future__ import annotations

import shutil

import pytest

from modsquad.data import synthesize

from .pascal_fixture import make_pascal_context_tree

SYNTH = {"images": 18, "size": 32, "seed": 3, "buildings": 3}  # 3 buildings x 2 points x 3 views


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, **SYNTH)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the suite that a test may damage."""
    return shutil.copytree(synth_root, tmp_path / "synth")


@pytest.fixture(scope="session")
def pascal_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("pascal")
    return root, make_pascal_context_tree(root)


@pytest.fixture
def pascal_copy(pascal_tree, tmp_path):
    root, truth = pascal_tree
    return shutil.copytree(root, tmp_path / "pascal"), truth
