"""Reading and writing dataset files with errors that name the file.

OpenCV returns `None` (or, for a truncated JPEG, a half-grey image) instead of raising, so every reader here checks
what it got and raises a `DataError` naming the path; callers never see a bare cv2/numpy traceback.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..core.errors import DataError

_JPEG_EOI = b"\xff\xd9"


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing file {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Decode a PNG/JPEG as stored: uint8 or uint16, [H, W] or [H, W, 3] in RGB order (alpha dropped)."""
    path = Path(path)
    buf = _read_bytes(path)
    if path.suffix.lower() in (".jpg", ".jpeg") and _JPEG_EOI not in buf[-16:].tobytes():
        raise DataError(f"unreadable image {path}: truncated JPEG (no end-of-image marker)")
    a = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if a is None:
        raise DataError(f"unreadable image {path}: not a valid PNG/JPEG (corrupt or truncated)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    elif a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_BGRA2RGB if a.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return a


def read_rgb(path: str | Path) -> np.ndarray:
    """An 8-bit RGB image [H, W, 3]; grey images are repeated, 16-bit images scaled down."""
    a = read_image(path)
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a)


def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG as its stored indices [H, W] (palette PNGs give palette indices, not colours)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        with Image.open(path) as im:
            a = np.array(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None
    return a[..., 0] if a.ndim == 3 else a


def read_npy(path: str | Path) -> np.ndarray:
    """A numeric .npy array (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"unreadable array {path}: {e}") from None
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"unreadable array {path}: dtype {a.dtype} is not numeric")
    return a


def read_mat(path: str | Path, **kw):
    """A MATLAB .mat file as a dict (scipy.io.loadmat keyword arguments pass through)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        return loadmat(path, **kw)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, ... on bad files
        raise DataError(f"unreadable .mat file {path}: {e}") from None


def read_any(path: str | Path) -> np.ndarray:
    """Read a Taskonomy domain file by extension: .npy arrays, everything else as an image."""
    return read_npy(path) if Path(path).suffix == ".npy" else read_image(path)


def write_image(path: str | Path, a: np.ndarray, png_compression: int = 1) -> None:
    """Write uint8/uint16 [H, W] or RGB [H, W, 3] as PNG (or JPEG by extension), creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if a.ndim == 3:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_COMPRESSION, png_compression] if path.suffix.lower() == ".png" else []
    if not cv2.imwrite(str(path), a, params):
        raise DataError(f"cannot write {path}")
