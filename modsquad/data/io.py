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
_JPEG_SOS = 0xDA
_UNSIZED_MARKERS = {0x01, *range(0xD0, 0xDA)}  # TEM, RSTn, SOI, EOI: no length field


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG stream reaches its end-of-image marker. Walks the marker segments to the first scan, then
    looks for EOI in what follows (entropy-coded data cannot hold 0xFFD9), so bytes after EOI (motion photos,
    padding) and EOIs inside an EXIF thumbnail before the scan do not matter."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _UNSIZED_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _JPEG_SOS:
            return data.find(_JPEG_EOI, pos + 2 + length) >= 0
        pos += 2 + length
    return False


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing file {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _decode(buf: np.ndarray, path: Path) -> np.ndarray:
    if path.suffix.lower() in (".jpg", ".jpeg", ".jfif") and buf[:2].tobytes() == b"\xff\xd8" \
            and not jpeg_is_complete(buf.tobytes()):
        raise DataError(f"unreadable image {path}: truncated JPEG (no end-of-image marker)")
    try:
        a = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        detail = next((line.strip() for line in str(e).splitlines()[::-1] if line.strip()), "")
        raise DataError(f"unreadable image {path}: OpenCV cannot decode it ({detail})") from None
    if a is None:
        raise DataError(f"unreadable image {path}: not a valid image file (corrupt, truncated or an unsupported "
                        f"format)")
    return a


def read_image(path: str | Path, orient: bool = False) -> np.ndarray:
    """Decode an image file as stored: uint8 or uint16 (float for float TIFFs), [H, W] or [H, W, 3] in RGB order
    (alpha dropped). `orient`: turn it as its EXIF orientation says, as viewers show photos (dataset files keep
    their stored pixels, which their labels match)."""
    path = Path(path)
    buf = _read_bytes(path)
    if buf.size == 0:
        raise DataError(f"unreadable image {path}: empty file")
    a = _decode(buf, path)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    elif a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_BGRA2RGB if a.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return apply_exif_orientation(a, exif_orientation(buf)) if orient else a


def exif_orientation(buf: np.ndarray | bytes) -> int:
    """The EXIF orientation tag (1-8) of an encoded image, 1 when it has none or it cannot be read."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(buf))) as im:
            value = int(im.getexif().get(0x0112, 1))
    except Exception:  # no or broken EXIF: the stored orientation
        return 1
    return value if 1 <= value <= 8 else 1


def apply_exif_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels [H, W(, C)] as stored -> as displayed, for EXIF orientation 1-8 (PIL's `exif_transpose`)."""
    ops = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.swapaxes(0, 1),
        6: lambda x: np.rot90(x, -1),  # 90 degrees clockwise
        7: lambda x: x[::-1, ::-1].swapaxes(0, 1),
        8: lambda x: np.rot90(x, 1),
    }
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


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
