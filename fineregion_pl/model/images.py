"""The one image reader of every front door (training transforms, predict, the API, the demo, the server).

:func:`as_rgb` turns whatever a user hands in (a path, bytes, a PIL image, a numpy array or a
tensor) into an upright 8-bit RGB PIL image, the same way everywhere:

- EXIF orientation is applied (a phone photo is upright, as in a viewer);
- 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) are scaled to 8 bits by their type's range,
  not clipped (PIL's ``convert("RGB")`` clips them, so a 16-bit PNG would become white);
- palette images with a transparent colour, ``LA``/``RGBA`` and other alpha images are composited
  on white (the convention of browsers and image viewers), not on the hidden colour values;
- CMYK (and YCbCr, LAB, ...) go through PIL's conversion to RGB.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fineregion_pl.model.errors import BadInputError

_MAXIMA = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}


def _to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image as ``L``, scaled by the range of its type."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _MAXIMA:
        top = _MAXIMA[image.mode]
    elif image.mode == "F":
        top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    else:  # "I": 32-bit ints, in practice 16-bit data (PIL opens many 16-bit PNGs as "I")
        top = 65535.0 if values.size and values.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.nan_to_num(values) / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _array_image(array: Any, where: str) -> Image.Image:
    """A ``(H, W)``, ``(H, W, 3|4)`` (or ``(3|4, H, W)`` tensor) array as a PIL image."""
    if hasattr(array, "detach"):  # a torch tensor, channels first
        array = array.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise BadInputError(f"{where}: an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if array.dtype == np.uint16:
        return Image.fromarray((array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8))
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        values = np.nan_to_num(array.astype(np.float64))
        top = 1.0 if np.issubdtype(array.dtype, np.floating) and values.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    raise BadInputError(f"{where}: an image array of dtype {array.dtype} is not a picture")


def open_image(source: Any, where: str = "image") -> Image.Image:
    """A decoded PIL image (pixels loaded, so a truncated file fails here) from a path, bytes, a PIL
    image, a numpy array or a tensor; anything else, or an undecodable file, is a one-line
    :class:`BadInputError` naming ``where``."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path, bytes, bytearray)):
        label = f"{where} {source}" if isinstance(source, (str, Path)) else where
        try:
            image = Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source)
            image.load()
            return image
        except FileNotFoundError:
            raise BadInputError(f"{label}: not found") from None
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadInputError(f"{label} cannot be decoded: {text}") from None
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        return _array_image(source, where)
    raise BadInputError(f"{where} must be a PIL image, a numpy array, a tensor, a path or bytes, not {type(source).__name__}")


def as_rgb(source: Any, where: str = "image", orientation: bool = True) -> Image.Image:
    """An upright 8-bit RGB PIL image from anything :func:`open_image` takes (see the module docstring).

    ``orientation=False`` keeps the stored pixel layout (the converters: dataset boxes refer to the
    stored pixels, and the shard they write carries no orientation tag, so every reader agrees)."""
    image = open_image(source, where)
    if orientation:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture; it stays as stored
            pass
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def has_orientation(image: Image.Image) -> bool:
    """Whether an image carries an EXIF orientation other than "as stored"."""
    try:
        return image.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF counts as none, as in as_rgb
        return False


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened (not necessarily decoded) image once its EXIF orientation is applied."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: as_rgb leaves such an image as stored
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in _TRANSPOSED else (width, height)
