"""Reading image files for the tokenizer: the one decoding path of the CLI and `tokenize_dataset`.

`load_image(path_or_bytes)` opens an image file, refuses decompression bombs and absurd aspect ratios before decoding
it, applies its EXIF orientation and returns an 8-bit mode "L" or "RGB" image (`to_8bit`), which is what
`QGVAEImageProcessor` turns into `pixel_values`. The processor applies `to_8bit` and `check_aspect_ratio` to the PIL
images it is handed too, so an image gives the same pixels however it arrives.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps

# A 1 x 1,000,000 strip has its shortest edge resized to S by the processor: S x S*10**6 pixels (2.2 GiB for S = 28)
MAX_ASPECT_RATIO = 64

_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_GREY_MODES = ("1", "L", "LA", "La", "I", "F", *_16_BIT_MODES)


class ImageLoadError(ValueError):
    """An image file that is missing, unreadable or refused; the message names the file."""


def check_aspect_ratio(width: int, height: int, name: str = "image") -> None:
    """Raise `ValueError` naming `name` if `width` x `height` is empty or longer than `MAX_ASPECT_RATIO`:1."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"{name} of {width}x{height} pixels is refused: its aspect ratio exceeds {MAX_ASPECT_RATIO}:1 (resizing "
            f"its shortest edge would make a huge image); crop it first"
        )


def _scale_to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """`values / full_scale * 255` (or min-max scaled when `full_scale` is None), rounded to uint8; NaN and inf -> 0."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if full_scale is None:
        low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        values = values / full_scale
    return np.where(finite, np.clip(np.round(values * 255), 0, 255), 0).astype(np.uint8)


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image -> an 8-bit image of mode "L" (grey sources) or "RGB" (colour sources).

    Pillow's own `convert("L")` clips 16-bit and float pixels at 255, so these are scaled by their range instead:

    - 16-bit ("I;16", "I;16B", ...): divided by 257, so 0..65535 maps onto 0..255 exactly;
    - 32-bit integer ("I"): the 16-bit rule when every value lies in [0, 65535], else min-max scaled to 0..255;
    - 32-bit float ("F"): multiplied by 255 when every value lies in [0, 1], else min-max scaled to 0..255;

    with values rounded to the nearest integer, NaN and inf set to 0 (and left out of the min-max range), and a
    constant image that min-max scaling cannot stretch set to 0. Transparent images ("RGBA", "LA", "PA", palette or
    grey with a transparent colour) are composited onto white, as transformers' `convert_to_rgb` does; "1", "P",
    "CMYK", "YCbCr", ... are converted by Pillow. "L" and "RGB" images are returned as they are.
    """
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in (*_16_BIT_MODES, "I", "F"):
        values = np.asarray(image)
        full_scale = 1.0 if image.mode == "F" else 65535.0
        in_range = image.mode in _16_BIT_MODES or bool(0 <= np.nanmin(values) and np.nanmax(values) <= full_scale)
        return PIL.Image.fromarray(_scale_to_uint8(values, full_scale if in_range else None))
    grey = image.mode in _GREY_MODES
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("L" if grey else "RGB")
    return image.convert("L" if grey else "RGB")


def load_image(
    source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO, name: str | None = None
) -> PIL.Image.Image:
    """An image file (path, encoded bytes or binary file object) -> a loaded 8-bit PIL image, mode "L" or "RGB".

    In order: the header is read and the image refused if it has more than `PIL.Image.MAX_IMAGE_PIXELS` pixels
    (a decompression bomb; `None` turns the check off) or an aspect ratio above `MAX_ASPECT_RATIO`:1, both before
    any pixel is decoded; the pixels are decoded; the EXIF orientation is applied (`PIL.ImageOps.exif_transpose`);
    the image is converted by `to_8bit` (16-bit and float images scaled by their range, transparency composited onto
    white). Multi-frame files (GIF, TIFF) give their first frame.

    Args:
        source: a file path, the bytes of an encoded image, or a binary file object.
        name: how errors name the image (default: the path, or "image bytes").

    Raises:
        ImageLoadError (a `ValueError`): the file is missing, is a folder, cannot be decoded or is refused; the
            message names the file.
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or os.fspath(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif not hasattr(source, "read"):
        raise TypeError(f"source must be a path, bytes or a binary file object, got {type(source).__name__}")
    label = repr(name) if name is not None else "image bytes"
    try:
        with warnings.catch_warnings():  # the pixel limit is enforced below, as an error
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(source)
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{label} is a folder, expected an image file") from None
    except PIL.Image.DecompressionBombError as error:
        raise ImageLoadError(f"{label} is refused as a possible decompression bomb ({error})") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageLoadError(f"{label} is not a readable image ({error})") from None
    try:
        width, height = image.size
        limit = PIL.Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            raise ImageLoadError(
                f"{label} is refused as a possible decompression bomb: {width}x{height} = {width * height} pixels "
                f"exceeds PIL.Image.MAX_IMAGE_PIXELS = {limit}"
            )
        try:
            check_aspect_ratio(width, height, label)
        except ValueError as error:
            raise ImageLoadError(str(error)) from None
        try:
            image.load()
            return to_8bit(PIL.ImageOps.exif_transpose(image))
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise ImageLoadError(f"{label} is not a readable image ({error})") from None
    finally:
        image.close()  # the returned image is a copy: exif_transpose copies when it does not transpose


__all__ = ["MAX_ASPECT_RATIO", "ImageLoadError", "check_aspect_ratio", "load_image", "to_8bit"]
