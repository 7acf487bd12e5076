"""`image_io.load_image` and `to_8bit`: EXIF orientation, 16-bit and float scaling, alpha, refused and broken files."""

import io
import re
import time

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
from datasets import Image

from qg_tokenizer.image_io import MAX_ASPECT_RATIO, ImageLoadError, load_image, to_8bit
from qg_tokenizer.tokenize import _decode_image


def ramp_rgb(height: int, width: int) -> PIL.Image.Image:
    """An asymmetric colour pattern: any flip or rotation changes its pixels."""
    y, x = np.mgrid[:height, :width]
    return PIL.Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], -1).astype(np.uint8))


def exif_jpeg(path, orientation: int = 6) -> None:
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = orientation
    ramp_rgb(12, 24).save(path, format="JPEG", quality=95, exif=exif)


def test_exif_orientation_is_applied_by_both_decoding_paths(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif_jpeg(path)  # stored 24 wide x 12 high, "rotate 90 degrees clockwise to display"
    raw = PIL.Image.open(path)
    assert raw.size == (24, 12)
    expected = np.asarray(PIL.ImageOps.exif_transpose(raw).convert("RGB"))
    assert expected.shape == (24, 12, 3)

    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (12, 24)
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), expected)
    # tokenize_dataset's decoder of an `Image` cell, by path and by bytes
    for cell in ({"bytes": None, "path": str(path)}, {"bytes": path.read_bytes(), "path": None}):
        np.testing.assert_array_equal(np.asarray(_decode_image(Image(), cell, 0, "image")), expected)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(levels * 257).save(path)  # 0, 257, ..., 65535
    assert PIL.Image.open(path).mode == "I;16"
    image = load_image(path)
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), levels)  # Pillow's convert("L") would give 0, 255, 255, ...
    big_endian = PIL.Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], ">u2").tobytes())
    assert np.asarray(to_8bit(big_endian)).tolist() == [[0, 128, 255]]


def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    values = np.random.default_rng(0).random((8, 10), dtype=np.float32)
    path = tmp_path / "float.tiff"
    PIL.Image.fromarray(values).save(path)
    assert PIL.Image.open(path).mode == "F"
    image = load_image(path)
    assert image.mode == "L" and image.size == (10, 8)
    np.testing.assert_array_equal(np.asarray(image), np.round(values * 255).astype(np.uint8))


def test_out_of_range_float_and_int_images_are_min_max_scaled():
    floats = PIL.Image.fromarray(np.float32([[-3.0, 1.0, 5.0, np.nan]]))
    assert np.asarray(to_8bit(floats)).tolist() == [[0, 128, 255, 0]]
    ints = PIL.Image.fromarray(np.int32([[-100, 0, 100]]))
    assert ints.mode == "I" and np.asarray(to_8bit(ints)).tolist() == [[0, 128, 255]]
    sixteen_bit_range = PIL.Image.fromarray(np.int32([[0, 257, 65535]]))  # "I" within [0, 65535]: the 16-bit rule
    assert np.asarray(to_8bit(sixteen_bit_range)).tolist() == [[0, 1, 255]]
    assert np.asarray(to_8bit(PIL.Image.fromarray(np.float32([[7.0, 7.0]])))).tolist() == [[0, 0]]


def test_transparency_is_composited_onto_white():
    rgba = PIL.Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = to_8bit(rgba)
    assert out.mode == "RGB" and np.asarray(out).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    la = PIL.Image.fromarray(np.uint8([[[0, 0], [40, 255]]]), mode="LA")
    assert to_8bit(la).mode == "L" and np.asarray(to_8bit(la)).tolist() == [[255, 40]]
    palette = PIL.Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 100, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_8bit(palette)).tolist() == [[[255, 255, 255], [200, 100, 0]]]
    grey, rgb = PIL.Image.new("L", (3, 3), 7), ramp_rgb(3, 3)
    assert to_8bit(grey) is grey and to_8bit(rgb) is rgb


def test_a_long_strip_is_refused_quickly_naming_the_file(tmp_path):
    path = tmp_path / "strip.png"
    PIL.Image.new("L", (100_000, 1), 128).save(path)
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=rf"{re.escape(repr(str(path)))} of 100000x1 pixels .*exceeds 64:1"):
        load_image(path)
    assert time.perf_counter() - start < 1.0
    PIL.Image.new("L", (MAX_ASPECT_RATIO, 1)).save(path)  # the limit itself is accepted
    assert load_image(path).size == (64, 1)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    PIL.Image.new("L", (40, 40)).save(path)
    name = re.escape(repr(str(path)))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match=rf"{name} is refused as a possible decompression bomb: 40x40 = 1600"):
        load_image(path)  # between the limit and twice it Pillow only warns
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageLoadError, match=rf"{name} is refused as a possible decompression bomb"):
        load_image(path)  # Pillow's own DecompressionBombError
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).size == (40, 40)


def test_missing_and_broken_files_name_the_file(tmp_path):
    def name(path) -> str:
        return re.escape(repr(str(path)))

    with pytest.raises(ImageLoadError, match=rf"{name(tmp_path / 'nope.png')}: no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match=rf"{name(tmp_path)} is a folder"):
        load_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match=rf"{name(tmp_path / 'text.png')} is not a readable image"):
        load_image(tmp_path / "text.png")
    png = io.BytesIO()
    PIL.Image.new("L", (32, 32), 1).save(png, format="PNG")
    with pytest.raises(ImageLoadError, match=r"'row 3' is not a readable image"):
        load_image(png.getvalue()[:60], name="row 3")  # truncated: the header reads, the pixels do not
    with pytest.raises(TypeError, match="source must be a path, bytes or a binary file object, got int"):
        load_image(3)
