"""`check_dataset`: find missing, unreadable and wrong-shaped files before a run starts, not hours into it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import DataError, UnknownNameError
from ..tasks.registry import PASCAL_CONTEXT_TASKS, class_vector_problem, decode_depth, decode_unit16
from . import pascal_context as pc
from .io import read_any, read_rgb
from .taskonomy import (
    building_dirs,
    evenly_spaced,
    index_domain,
    label_shape_error,
    resolve_buildings,
    taskonomy_spec,
    taskonomy_tasks,
)

FORMATS = ("taskonomy", "pascal_context", "synthetic")
_PASCAL_DIRS = {"semseg": "semseg", "human_parts": "human_parts", "sal": "sal_distill",
                "normals": "normals_distill", "edge": "pascal-context/trainval"}


def normalise_format(format: str) -> str:
    """Accept "pascal-context" (CLI spelling) as well as "pascal_context"; "synthetic" is Taskonomy on disk."""
    f = format.replace("-", "_").lower()
    if f not in FORMATS:
        raise UnknownNameError(f"unknown dataset format {format!r}; choose from taskonomy, pascal-context, synthetic")
    return f


@dataclass
class DomainReport:
    """Files of one domain: how many exist, which samples lack one, which are unreadable or wrong-shaped
    (entries are "path: reason" strings). Class vectors that are neither logits nor a distribution (see
    `class_vector_problem`) count as unreadable: they cannot be decoded as their task means."""

    domain: str
    found: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.found - len(self.unreadable) - len(self.wrong_shape)


@dataclass
class DataCheckReport:
    """Per-domain findings of `check_dataset`; `ok_for(tasks)` says whether those tasks can be trained as is."""

    root: str
    format: str
    samples: int
    domains: dict[str, DomainReport]
    tasks: list[str]
    buildings_missing: dict[str, list[str]] = field(default_factory=dict)

    def problems_for(self, tasks: Sequence[str] | None = None) -> list[str]:
        """Why `tasks` (default: every checked task) cannot be trained; missing labels alone are fine (masked)."""
        out = []
        for d in ["rgb", *(tasks if tasks is not None else self.tasks)]:
            rep = self.domains.get(d)
            if rep is None or rep.usable <= 0:
                out.append(f"{d}: no usable files" + ("" if d == "rgb" else " (every sample lacks this label)"))
            elif rep.unreadable or rep.wrong_shape:
                out.append(f"{d}: {len(rep.unreadable)} unreadable and {len(rep.wrong_shape)} wrong-shaped files "
                           f"(replace them, or train with on_error=skip)")
        return out

    def ok_for(self, tasks: Sequence[str] | None = None) -> bool:
        return not self.problems_for(tasks)

    def raise_for(self, tasks: Sequence[str] | None = None) -> None:
        """DataError (exit code 2 in the CLI) naming every problem of `tasks`."""
        problems = self.problems_for(tasks)
        if problems:
            raise DataError(f"cannot train {', '.join(tasks or self.tasks) or 'anything'} from {self.root} ("
                            + "; ".join(problems) + ")")


def _expected_dtype(spec) -> type | None:
    if spec.file_ext == "npy":
        return None
    return np.uint16 if spec.decode in (decode_depth, decode_unit16) else np.uint8


def _check_taskonomy(root: Path, tasks: Sequence[str] | None, split: str | None, split_set: str | None,
                     max_samples: int | None) -> DataCheckReport:
    if tasks is None:
        tasks = [t for t in taskonomy_tasks() if (root / t).is_dir()]
    specs = {t: taskonomy_spec(t) for t in tasks}
    domains = {"rgb": DomainReport("rgb"), **{t: DomainReport(t) for t in specs}}
    if not building_dirs(root, "rgb"):
        return DataCheckReport(str(root), "taskonomy", 0, domains, list(specs))
    buildings = resolve_buildings(root, split, split_set)
    rgb = index_domain(root, "rgb", buildings)
    keys = sorted(rgb)
    keys = [keys[i] for i in evenly_spaced(len(keys), max_samples)]
    indexes = {t: index_domain(root, t, buildings) for t in specs}
    lacking: dict[str, set[str]] = {}
    for key in keys:
        sid = f"{key[0]}/point_{key[1]}_view_{key[2]}"
        hw = None
        domains["rgb"].found += 1
        try:
            hw = read_rgb(rgb[key]).shape[:2]
        except DataError as e:
            domains["rgb"].unreadable.append(str(e))
        for t, spec in specs.items():
            rep, path = domains[t], indexes[t].get(key)
            if path is None:
                rep.missing.append(sid)
                lacking.setdefault(key[0], set()).add(t)
                continue
            rep.found += 1
            try:
                raw = read_any(path)
                want = _expected_dtype(spec)
                if want is not None and raw.dtype != want:
                    rep.wrong_shape.append(f"{path}: stored as {raw.dtype}, {t} is {np.dtype(want).name}")
                    continue
                target, _ = spec.decode(raw)
                problem = class_vector_problem(t, raw) if spec.kind == "classification" else None
                if problem:
                    rep.unreadable.append(f"{path}: {t} vector {problem}")
                    continue
            except DataError as e:
                rep.unreadable.append(str(e))
                continue
            except (ValueError, IndexError, TypeError) as e:
                rep.unreadable.append(f"{path}: cannot decode as {t} ({e})")
                continue
            err = label_shape_error(path, spec, target, hw) if hw is not None or not spec.is_dense else None
            if err:
                rep.wrong_shape.append(err)
    return DataCheckReport(str(root), "taskonomy", len(keys), domains, list(specs),
                           {b: sorted(ts) for b, ts in sorted(lacking.items())})


def _check_pascal(root: Path, tasks: Sequence[str] | None, split: str | None,
                  max_samples: int | None) -> DataCheckReport:
    if tasks is None:
        tasks = [t for t in PASCAL_CONTEXT_TASKS if (root / _PASCAL_DIRS[t]).is_dir()]
    unknown = [t for t in tasks if t not in PASCAL_CONTEXT_TASKS]
    if unknown:
        raise UnknownNameError(f"task(s) {', '.join(unknown)} are not PASCAL-Context tasks; "
                               f"choose from {', '.join(PASCAL_CONTEXT_TASKS)}")
    splits = [split] if split else [s for s in pc.SPLITS if (root / "ImageSets" / "Context" / f"{s}.txt").is_file()]
    if not splits:
        raise DataError(f"no split files under {root / 'ImageSets' / 'Context'} (expected train.txt and val.txt)")
    ids = list(dict.fromkeys(i for s in splits for i in pc.image_ids(root, s)))
    ids = [ids[i] for i in evenly_spaced(len(ids), max_samples)]
    domains = {"rgb": DomainReport("rgb"), **{t: DomainReport(t) for t in tasks}}
    for image_id in ids:
        hw = None
        path = pc.image_path(root, image_id)
        if not path.is_file():
            domains["rgb"].missing.append(image_id)
        else:
            domains["rgb"].found += 1
            try:
                hw = read_rgb(path).shape[:2]
            except DataError as e:
                domains["rgb"].unreadable.append(str(e))
        for t in tasks:
            rep = domains[t]
            if not pc.task_path(root, t, image_id).is_file():
                rep.missing.append(image_id)
                continue
            rep.found += 1
            if hw is None:
                continue
            try:
                pc.decode_label(root, t, image_id, hw)
            except DataError as e:
                (rep.wrong_shape if str(e).startswith("wrong shape") else rep.unreadable).append(str(e))
    return DataCheckReport(str(root), "pascal_context", len(ids), domains, list(tasks))


def check_dataset(root: str | Path, format: str = "taskonomy", tasks: Sequence[str] | None = None,
                  split: str | None = None, split_set: str | None = None,
                  max_samples: int | None = None) -> DataCheckReport:
    """Read every file a run would read and report, per domain, what is missing, unreadable or wrong-shaped.

    Args:
        root: dataset root.
        format: "taskonomy" (also the synthetic suite) or "pascal_context" / "pascal-context".
        tasks: tasks to check (default: every task whose folder exists).
        split: restrict to one split (default: every building / both PASCAL splits).
        max_samples: check an evenly spread subset of this many samples (full datasets are large).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    fmt = normalise_format(format)
    if fmt == "pascal_context":
        return _check_pascal(root, tasks, split, max_samples)
    return _check_taskonomy(root, tasks, split, split_set, max_samples)
