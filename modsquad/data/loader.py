"""`build_dataset`: the one entry point the trainer and evaluation use to get a dataset by format name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from ..core.errors import DataError
from .check import normalise_format
from .pascal_context import PascalContextDataset
from .synthetic import INFO_FILE
from .taskonomy import TaskonomyDataset


def build_dataset(format: str, root: str | Path, tasks: Sequence[str], split: str | None, img_size: int,
                  train: bool, max_images: int | None = None, on_error: str = "raise",
                  split_set: str | None = None, **kw) -> Dataset:
    """A torch Dataset of `{"image", "targets", "masks", "id"}` samples.

    Args:
        format: "taskonomy", "pascal_context" (or "pascal-context") or "synthetic" (the Taskonomy loader on a
            folder written by `modsquad data synth`).
        root: dataset root.
        tasks: task names from the task registry.
        split: "train", "val", "test" (Taskonomy), or None / "all" for everything (Taskonomy).
        img_size: output side of images and dense labels.
        train: augment (True) or only resize (False).
        max_images: keep this many samples, evenly spread.
        on_error: "raise" a DataError naming the file, or "skip" bad files with a logged warning.
        split_set: Taskonomy split list when ROOT has no splits/ folder ("tiny", "medium", "full", "fullplus").
        **kw: passed to the dataset class (e.g. `buildings=`, `transform=`, `normals_valid_classes=`).
    """
    fmt = normalise_format(format)
    root = Path(root)
    if fmt == "synthetic" and not (root / INFO_FILE).is_file():
        raise DataError(f"{root} holds no synthetic suite; make one with `modsquad data synth {root}`")
    if not root.is_dir():
        raise DataError(f"dataset root {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    if fmt == "pascal_context":
        return PascalContextDataset(root, tasks, split or "train", img_size, train, max_images=max_images,
                                    on_error=on_error, **kw)
    return TaskonomyDataset(root, tasks, split, img_size, train, split_set=split_set, max_images=max_images,
                            on_error=on_error, **kw)
