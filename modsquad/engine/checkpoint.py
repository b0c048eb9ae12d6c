"""Model checkpoints: safetensors weights plus the model config in the file's metadata (no pickle).

A checkpoint is one `.safetensors` file whose metadata holds

    format        "modsquad"
    version       modsquad version that wrote it
    model_config  json.dumps(model.config): enough to rebuild the architecture (`build_model_from_config`)
    <extra>       anything the caller adds (step, epoch, metrics, ...); non-string values are JSON-encoded

so `load_model(path)` needs nothing but the file. A run directory (`runs/NAME/`) may be given instead of a file:
`best.safetensors` is preferred, then `last.safetensors`. Every file is written atomically (temporary file in
the same directory, then `os.replace`), so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import CheckpointError, UserError

FORMAT = "modsquad"
RUN_DIR_CANDIDATES = ("best.safetensors", "last.safetensors")
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`, on error
    removed, so readers only ever see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call `write_fn(tmp_path)` to write the file, then move it onto `path` atomically; returns `path`.

    Example: `atomic_write("runs/a/metrics.json", lambda p: p.write_text(text))`.
    """
    with atomic_path(path) as tmp:
        write_fn(tmp)
    return Path(path)


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


def save_model(path: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> Path:
    """Write `model`'s weights and config (`model.config`) to a safetensors file, atomically; returns `path`."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__} has no dict `config`; only modsquad models can be saved")
    metadata = {"format": FORMAT, "version": __version__, "model_config": json.dumps(config)}
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata key {key!r} is reserved")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    state = _plain_state_dict(model)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run directory."""
    path = Path(path_or_run_dir)
    if path.is_dir():
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
    from ..models.registry import build_model_from_config  # models import heavy deps; keep this module light

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
