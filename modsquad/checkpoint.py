"""Model checkpoints: safetensors weights plus the model config in the file's metadata (no pickle).

A checkpoint is one `.safetensors` file whose metadata holds

    format        "modsquad"
    version       modsquad version that wrote it
    model_config  json.dumps(model.config): enough to rebuild the architecture (`build_model_from_config`)
    <extra>       anything the caller adds (step, epoch, metrics, ...); non-string values are JSON-encoded

so `load_model(path)` needs nothing but the file. A run directory (`runs/NAME/`) may be given instead of a file:
`best.safetensors` is preferred, then `last.safetensors`. Every file is written atomically (temporary file in
the same directory, then `os.replace`), so a crash never leaves a half-written checkpoint under the real name.

A training checkpoint is several files (last, best, state.pt) that must match; `commit_run_checkpoint` writes
them into a fresh folder `RUN/ckpt/<seq>/` and commits them all at once by atomically replacing the pointer
`RUN/checkpoint.json`, then hard-links them to `RUN/last.safetensors`, `RUN/best.safetensors`, `RUN/state.pt`
(for users and tools). A kill at any instant leaves the pointer on the previous or the new folder, both
complete; `--resume` reads the pointer (`committed_run_files`) and repairs the top-level links.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .core.atomic import atomic_path, atomic_write, chmod_default, fsync_dir, fsync_file, link_or_copy
from .core.errors import CheckpointError, UserError
from .core.version import __version__
from .models.registry import build_model_from_config

FORMAT = "modsquad"
RUN_DIR_CANDIDATES = ("best.safetensors", "last.safetensors")
RUN_FILES = ("last.safetensors", "best.safetensors", "state.pt")
POINTER = "checkpoint.json"
POINTER_FORMAT = "modsquad-run-checkpoint"
CKPT_DIR = "ckpt"

__all__ = ["atomic_path", "atomic_write", "commit_run_checkpoint", "committed_run_files", "load_model",
           "model_writer", "read_metadata", "read_model_config", "read_state_dict", "resolve_checkpoint",
           "save_model", "sync_run_files"]


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their memory: safetensors refuses shared or strided ones."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen or not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        state[name] = t
    return state


def model_writer(model: nn.Module, extra: dict | None = None) -> Callable[[str | os.PathLike], None]:
    """A function writing `model`'s weights and config (`model.config`) as safetensors to the path it is given
    (not atomically by itself: pass it to `atomic_write` or `commit_run_checkpoint`)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__} has no dict `config`; only modsquad models can be saved")
    metadata = {"format": FORMAT, "version": __version__, "model_config": json.dumps(config)}
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata key {key!r} is reserved")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    state = _plain_state_dict(model)
    return lambda path: save_file(state, str(path), metadata=metadata)


def save_model(path: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> Path:
    """Write `model`'s weights and config (`model.config`) to a safetensors file, atomically; returns `path`."""
    return atomic_write(path, model_writer(model, extra))


# --- run checkpoints: several files committed as one unit -------------------------------------------------

def _read_pointer(run_dir: Path) -> dict | None:
    path = run_dir / POINTER
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint pointer ({e})") from None
    if (not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT
            or not isinstance(pointer.get("dir"), str) or not isinstance(pointer.get("files"), list)):
        raise CheckpointError(f"{path}: not a modsquad checkpoint pointer")
    return pointer


def committed_run_files(run_dir: str | os.PathLike) -> dict[str, Path] | None:
    """{file name: path} of the run's committed checkpoint (RUN/checkpoint.json), or None for a run that has
    none (not trained yet, or written by an older modsquad: then only the top-level files exist)."""
    run_dir = Path(run_dir)
    pointer = _read_pointer(run_dir)
    if pointer is None:
        return None
    folder = run_dir / pointer["dir"]
    files = {name: folder / name for name in pointer["files"]}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise CheckpointError(f"{run_dir / POINTER}: committed checkpoint {folder} lacks {', '.join(missing)} "
                              f"(files removed by hand?)")
    return files


def _next_seq(ckpt: Path) -> int:
    seqs = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
    return max(seqs, default=0) + 1


def commit_run_checkpoint(run_dir: str | os.PathLike, writers: Mapping[str, Callable[[Path], object]],
                          carry: Sequence[str] = ("best.safetensors",), info: Mapping | None = None) -> Path:
    """Write the files of one checkpoint (`writers`: name -> fn(path)) and commit them as one unit.

    Files named in `carry` that the previous checkpoint has and `writers` does not are carried over (hard
    links). Order: write + fsync every file into a staging folder, rename it to `RUN/ckpt/<seq>`, atomically
    replace `RUN/checkpoint.json` (the commit), link the files to the run's top level, delete older folders.
    Returns the committed folder.
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / CKPT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    previous = committed_run_files(run_dir) or {}
    if not previous:  # a run of an older modsquad: carry its top-level files
        previous = {name: run_dir / name for name in carry if (run_dir / name).is_file()}
    seq = _next_seq(ckpt)
    final = ckpt / f"{seq:06d}"
    staging = ckpt / f".staging-{seq:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, write in writers.items():
        write(staging / name)
        chmod_default(staging / name)  # safetensors' save_file creates 0600 files
        fsync_file(staging / name)
    for name in carry:
        if name not in writers and name in previous:
            link_or_copy(previous[name], staging / name)
    fsync_dir(staging)
    os.replace(staging, final)
    fsync_dir(ckpt)
    pointer = {"format": POINTER_FORMAT, "dir": f"{CKPT_DIR}/{final.name}", "files": sorted(os.listdir(final)),
               **dict(info or {})}
    atomic_write(run_dir / POINTER, lambda p: p.write_text(json.dumps(pointer, indent=1) + "\n"))
    sync_run_files(run_dir)
    return final


def sync_run_files(run_dir: str | os.PathLike) -> None:
    """Make `RUN/last.safetensors` etc. the committed checkpoint's files (hard links, each replaced atomically)
    and delete checkpoint folders that are not committed (older ones, or one a kill left uncommitted)."""
    run_dir = Path(run_dir)
    files = committed_run_files(run_dir)
    if files is None:
        return
    _link_top_level(run_dir, files)
    keep = next(iter(files.values())).parent.name
    for entry in (run_dir / CKPT_DIR).iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _link_top_level(run_dir: Path, files: Mapping[str, Path]) -> None:
    """Point `RUN/<name>` at each committed file (a hard link, replaced atomically) where it does not already."""
    changed = False
    for name, src in files.items():
        top = run_dir / name
        if top.is_file() and os.path.samefile(top, src):
            continue
        tmp = run_dir / f".{name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        link_or_copy(src, tmp)
        os.replace(tmp, top)
        changed = True
    if changed:
        fsync_dir(run_dir)


def _follow_commit(run_dir: Path) -> None:
    """A kill between a commit and its top-level links leaves those missing or one checkpoint behind: readers
    relink them (best effort: a read-only run keeps its files, and its committed step is still in checkpoint.json)."""
    try:
        files = committed_run_files(run_dir)
        if files:
            _link_top_level(run_dir, files)
    except (CheckpointError, OSError):
        pass


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run directory (its committed one)."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        _follow_commit(path)
        for name in RUN_DIR_CANDIDATES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run directory has no {' or '.join(RUN_DIR_CANDIDATES)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw (string) metadata of a modsquad checkpoint; CheckpointError if unreadable or not modsquad's."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / garbage headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise CheckpointError(f"{path}: not a modsquad checkpoint (no format={FORMAT!r} metadata)")
    return metadata


def read_model_config(path: str | os.PathLike) -> dict:
    """The `model.config` stored in a checkpoint."""
    path = resolve_checkpoint(path)
    try:
        return json.loads(read_metadata(path)["model_config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: model_config metadata is not valid JSON ({e})") from None


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, on `map_location`; CheckpointError if the file is corrupt or truncated."""
    path = resolve_checkpoint(path)
    try:
        return load_file(str(path), device=str(torch.device(map_location)))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None


def load_model(path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a checkpoint file (or run directory) and load its weights; returned in eval mode."""
    path = resolve_checkpoint(path_or_run_dir)
    config = read_model_config(path)
    try:
        model = build_model_from_config(config)
    except UserError as e:
        raise CheckpointError(f"{path}: stored model config cannot be built: {e}") from None
    state = read_state_dict(path)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the stored architecture "
                              f"(missing {_few(missing)}, unexpected {_few(unexpected)})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not match the stored architecture: {e}") from None
    return model.to(map_location).eval()


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
