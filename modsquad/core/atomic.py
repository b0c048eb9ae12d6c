"""Atomic writes: a reader (or a run killed at any instant) only ever sees the old file or the complete new one.

A file is written to a temporary name in the same folder, fsynced, renamed onto its real name (`os.replace` is
atomic on one file system) and the folder is fsynced so the rename itself survives a power cut. Folders are
staged the same way (`atomic_dir`) and moved into place with one rename.

    atomic_write("runs/a/metrics.json", lambda p: p.write_text(text))
    with atomic_dir("out/bench") as tmp: ...   # everything in tmp appears in out/bench at once
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_dir_path(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` as a Path; OutputPathError naming it when it or a folder above it is an existing file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise OutputPathError(f"{what} {path}: {p} is an existing file, not a folder; choose another path")
    return path


def ensure_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create folder `path` (and parents); OutputPathError naming it when a file stands in the way."""
    path = check_dir_path(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{what} {path}: cannot create it ({e.strerror or e})") from None
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's bytes to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


#: errors of the place an output goes, not of the program: reported as an OutputPathError naming the output
PLACE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Turn a read-only file system, a full disk (or quota) or a denied write into an OutputPathError naming
    `path` (the temporary file's name would only confuse)."""
    try:
        yield
    except OSError as e:
        if e.errno not in PLACE_ERRNOS:
            raise
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None


def chmod_default(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain `open` would (0666 less the umask); some writers create 0600 files."""
    os.chmod(path, 0o666 & ~_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`, on error
    removed, so readers only ever see the old file or the complete new one."""
    path = Path(path)
    ensure_dir(path.parent)
    if path.is_dir():
        raise OutputPathError(f"{path} is an existing folder; cannot write a file there")
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _naming(path):
            yield tmp
            fsync_file(tmp)
            chmod_default(tmp)  # mkstemp creates 0600
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call `write_fn(tmp_path)` to write the file, then move it onto `path` atomically; returns `path`.

    Example: `atomic_write("runs/a/metrics.json", lambda p: p.write_text(text))`.
    """
    with atomic_path(path) as tmp:
        write_fn(tmp)
    return Path(path)


@contextmanager
def staging_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder next to `out` (same file system, so renames are atomic), removed at exit."""
    out = Path(out)
    ensure_dir(out.parent)
    with _naming(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: str | os.PathLike, out: str | os.PathLike, names) -> None:
    """Move `staged/<name>` to `out/<name>` for every name (files or folders); an older entry is replaced only
    once the new one is complete, with one rename per name."""
    staged, out = Path(staged), ensure_dir(out)
    for name in names:
        target, new = out / name, Path(staged) / name
        if new.is_dir():
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=out))
                os.replace(target, old / name)
            os.replace(new, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                raise OutputPathError(f"{target} is an existing folder; cannot write a file there")
            fsync_file(new)
            os.replace(new, target)
    fsync_dir(out)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link `src` to the new name `dst` (no extra disk), copying where links are not supported."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        fsync_file(dst)


__all__ = ["PLACE_ERRNOS", "OutputPathError", "atomic_path", "atomic_write", "check_dir_path", "chmod_default", "ensure_dir", "fsync_dir",
           "fsync_file", "link_or_copy", "publish", "staging_dir"]
