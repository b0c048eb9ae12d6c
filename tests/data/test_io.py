"""data/io.py: image files as they come from cameras and phones, and clear errors for broken ones."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from modsquad.core.errors import DataError
from modsquad.data.io import jpeg_is_complete, read_image


@pytest.fixture
def jpeg(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "a.jpg", quality=95)
    return tmp_path / "a.jpg"


def test_data_after_the_end_of_image_marker_is_fine_a_cut_file_is_not(jpeg, tmp_path):
    data = jpeg.read_bytes()
    assert jpeg_is_complete(data)
    padded = tmp_path / "motion.jpg"  # motion photos append a video after the JPEG
    padded.write_bytes(data + b"\x00" * 64 + b"ftypmp42" * 100)
    assert np.array_equal(read_image(padded), read_image(jpeg))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:-200])
    assert not jpeg_is_complete(cut.read_bytes())
    with pytest.raises(DataError, match="truncated JPEG"):
        read_image(cut)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_image(empty)


def test_an_exif_thumbnail_does_not_hide_a_cut_scan(tmp_path):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    thumb = tmp_path / "thumb.jpg"
    im.resize((8, 8)).save(thumb)
    exif = Image.Exif()
    exif[0x0112] = 1
    exif_bytes = exif.tobytes()
    im.save(tmp_path / "full.jpg", exif=exif_bytes + thumb.read_bytes())  # an EOI inside APP1, before the scan
    data = (tmp_path / "full.jpg").read_bytes()
    assert jpeg_is_complete(data) and not jpeg_is_complete(data[:-300])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 255, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif.tobytes())
    with Image.open(tmp_path / "o.png") as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(read_image(tmp_path / "o.png", orient=True), shown)
    assert np.array_equal(read_image(tmp_path / "o.png"), stored)  # dataset files keep their stored pixels
