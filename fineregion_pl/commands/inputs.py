"""What the front doors (``demo``, ``serve``) accept from a person or a client, checked, with one-line messages.

Every problem is a :class:`~fineregion_pl.model.errors.BadInputError` whose message is shown as
it is: in the demo's message line, in the server's 4xx answer.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.images import as_rgb

NO_MODEL = "no model is loaded: start with --ckpt_path STAGE2.ckpt or --export_dir EXPORT_FOLDER"
IMAGE_HINT = "use a PNG, JPEG, GIF, BMP, TIFF or WebP file"


def pick_device(device: str) -> str:
    """``auto``: a GPU when there is one, else the CPU; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_captioner(ckpt_path: Optional[str] = None, export_dir: Optional[str] = None, device: str = "cpu") -> tuple[Any, Optional[str]]:
    """``(captioner, None)``, or ``(None, message)`` when there is no model to load or it does not load."""
    from fineregion_pl.api import RegionCaptioner

    if ckpt_path and export_dir:
        return None, "give either --ckpt_path or --export_dir, not both"
    if not ckpt_path and not export_dir:
        return None, NO_MODEL
    try:
        if ckpt_path:
            if not Path(ckpt_path).is_file():
                return None, f"checkpoint not found: {ckpt_path}"
            return RegionCaptioner.from_checkpoint(ckpt_path, device=device), None
        if not Path(export_dir).is_dir():
            return None, f"export folder not found: {export_dir}"
        return RegionCaptioner.from_export(export_dir, device=device), None
    except Exception as err:  # any failure to load is a message, not a dead front door
        source = ckpt_path or export_dir
        return None, f"could not load the model from {source}: {type(err).__name__}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message."""
    return (str(err).strip().splitlines() or [""])[0]


def read_image(data: Optional[bytes], max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes (EXIF orientation applied, as browsers show it).

    The pixel count is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing; the whole image is then decoded, so a truncated file fails here.
    """
    if not data:
        raise BadInputError("no image: the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise BadInputError(f"the image is too large: {width}x{height} pixels (at most {max_pixels:,} pixels)")
            opened.load()
            image = as_rgb(opened, "the image")  # the one reader of every front door (EXIF, 16-bit, palette, alpha, CMYK)
    except BadInputError:
        raise
    except Image.DecompressionBombError as err:  # PIL refuses to open it at all: more than twice its own pixel limit
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL opens"
        raise BadInputError(f"the image is too large: {size} (at most {max_pixels:,} pixels)") from None
    except UnidentifiedImageError:
        raise BadInputError(f"the file is not an image this server can read; {IMAGE_HINT}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on broken files
        raise BadInputError(f"the image could not be read ({type(err).__name__}: {first_line(err)}); {IMAGE_HINT}") from None
    if image.width < 1 or image.height < 1:
        raise BadInputError("the image is empty")
    return image


def format_box(box: Sequence[float]) -> str:
    """``[x0, y0, x1, y1]`` with short numbers."""
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def check_inside(box: Sequence[float], where: str, width: int, height: int) -> None:
    """A ``BadInputError`` naming the first coordinate of ``box`` outside a ``width`` x ``height`` image."""
    x0, y0, x1, y1 = box
    for name, value, high in (("x0", x0, width), ("y0", y0, height), ("x1", x1, width), ("y1", y1, height)):
        if not 0 <= value <= high:
            side = "width" if name[0] == "x" else "height"
            raise BadInputError(f"{where} {format_box(box)} is outside the {width}x{height} image: {name} = {value:g} is not within 0..{high} (the image {side})")


def check_count(count: int, max_regions: int) -> None:
    """A ``BadInputError`` when there are no regions or more than ``max_regions``."""
    if count == 0:
        raise BadInputError("no boxes: give at least one box [x0, y0, x1, y1] (image pixels)")
    if count > max_regions:
        raise BadInputError(f"{count} boxes is more than one request takes ({max_regions}; see --max_regions)")


_SEPARATORS = re.compile(r"[\s,;]+")


def _typed_number(text: str) -> float | str:
    """A number typed in a box field, or the text itself when it is not one (then refused by ``check_box``)."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_boxes(text: str, width: int, height: int, first: int = 1) -> list[list[float]]:
    """Boxes from text, one ``x0,y0,x1,y1`` per line (pixels of a ``width`` x ``height`` image).

    Commas, spaces or semicolons separate the numbers; brackets and empty lines are ignored, and so
    are lines starting with ``#``. Each box must be four finite numbers with ``x0 < x1``,
    ``y0 < y1``, inside the image; messages call them box ``first``, ``first + 1``...
    """
    boxes: list[list[float]] = []
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"box {first + len(boxes)} (line {number})"
        parts = [p for p in _SEPARATORS.split(line.strip("[]() \t")) if p]
        numbers = [_typed_number(p) for p in parts]
        try:  # a typed box is text: its numbers are read here, explicitly (check_box never reads strings)
            box = check_box(numbers, where)
        except BadInputError as err:
            raise BadInputError(str(err).replace(f"{numbers!r}", repr(line))) from None
        check_inside(box, where, width, height)
        boxes.append(box)
    return boxes
