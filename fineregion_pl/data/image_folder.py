"""Prediction input from a folder of images and a file of boxes, checked before anything runs.

The boxes file is JSON or JSONL, in pixels of the original images, ``xyxy``:

- JSON object: ``{"a.jpg": [[x0, y0, x1, y1], ...], ...}``
- JSON list or JSONL lines: ``{"image": "a.jpg", "boxes": [[x0, y0, x1, y1], ...], "ids": [...]}``
  (``ids`` optional: region ids default to 0, 1, ...)

A malformed box (not four finite numbers, ``x1 <= x0`` or ``y1 <= y0``, or outside its image)
stops the run before the model runs, with one line naming the file, the image and the region.
An image that is missing, unreadable or larger than ``max_pixels`` is skipped with one warning
line naming it, and counted (a truncated image found only when decoding too, by the prediction
writer's summary). Boxes are in the pixels of the upright image (EXIF orientation applied, as the
demo shows it); an image named twice, or with more than ``max_regions`` boxes, is an error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fineregion_pl.data.schemas import boxes_entries, read_json_file
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.images import as_rgb, upright_size
from fineregion_pl.model.transforms import RegionSample, to_region_sample


def _image_entries(path: Path) -> Any:
    """The parsed boxes file: a JSON value, or the list of a JSONL file's lines (validated by the caller)."""
    if path.suffix != ".jsonl":
        return read_json_file(path, "boxes file")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path}: line {number} is not JSON ({err.msg})") from None
    return entries


def read_boxes_file(path: str | Path) -> list[dict]:
    """Records ``{"image", "boxes", "ids"}`` from a boxes file, every box checked."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"boxes file not found: {path}")
    records = []
    for entry in boxes_entries(_image_entries(path), path):
        name, boxes = entry.image, entry.boxes
        ids = entry.ids if entry.ids is not None else list(range(len(boxes)))
        if len(ids) != len(boxes):
            raise BadInputError(f"{path}: image {name!r} has {len(boxes)} boxes but {len(ids)} ids")
        checked = [check_box(b, f"{path}: image {name!r} region {rid}") for b, rid in zip(boxes, ids)]
        records.append({"image": name, "boxes": checked, "ids": list(ids)})
    return records


class ImageBoxesDataset(Dataset):
    """Images of a folder with the boxes of a boxes file, as :class:`RegionSample` items.

    Every image is probed (its header only) when the dataset is made: missing, unreadable and
    oversized images are skipped with a warning and counted in ``skipped``; a box outside its
    image by more than ``box_tolerance`` pixels is an error naming it. Boxes within the
    tolerance are clamped.

    Args:
        image_dir: folder the boxes file's image names are relative to.
        boxes_file: JSON or JSONL boxes file (see the module docstring).
        image_size: side of the letterboxed model input.
        max_regions: at most this many regions per image (the first ones).
        max_pixels: larger images are skipped (decompression-bomb guard).
        box_tolerance: how far (pixels) a box may stick out of its image.
    """

    def __init__(self, image_dir: str | Path, boxes_file: str | Path, image_size: int, max_regions: int = 1000, max_pixels: int = 100_000_000, box_tolerance: float = 2.0):
        self.image_dir, self.boxes_file = Path(image_dir), Path(boxes_file)
        if not self.image_dir.is_dir():
            raise BadInputError(f"image folder not found: {self.image_dir}")
        self.image_size, self.max_regions, self.max_pixels = image_size, max_regions, max_pixels
        self.skipped: dict[str, int] = {}
        self.records = []
        for record in read_boxes_file(self.boxes_file):
            if len(record["boxes"]) > max_regions:
                raise BadInputError(f"{self.boxes_file}: image {record['image']!r} has {len(record['boxes'])} boxes, more than "
                                    f"max_regions={max_regions} (--data.predict_max_regions): raise it or split the image's boxes")
            size = self._probe(record["image"])
            if size is not None:
                record["size"] = size
                record["boxes"] = [self._inside(record, rid, box, size, box_tolerance) for rid, box in zip(record["ids"], record["boxes"])]
                self.records.append(record)

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        warnings.warn(message, stacklevel=3)

    def _probe(self, name: str) -> Optional[tuple[int, int]]:
        path = self.image_dir / name
        if not path.is_file():
            self._skip("missing_image", f"skipped image {path}: not found")
            return None
        try:
            with Image.open(path) as probe:
                size = upright_size(probe)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            self._skip("unreadable_image", f"skipped image {path}: unreadable ({str(err).splitlines()[0]})")
            return None
        if size[0] * size[1] > self.max_pixels:
            self._skip("oversized_image", f"skipped image {path}: {size[0]}x{size[1]} is over max_pixels={self.max_pixels}")
            return None
        return size

    def _inside(self, record: dict, rid: Any, box: list[float], size: tuple[int, int], tol: float) -> list[float]:
        x0, y0, x1, y1 = box
        width, height = size
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise BadInputError(f"{self.boxes_file}: image {record['image']!r} region {rid} box {box} is outside the {width}x{height} image")
        return [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Optional[RegionSample]:
        """The image's sample, or ``None`` (with a warning naming it) when its pixel data is broken
        (a truncated file passes the header probe); the prediction writer counts it as skipped."""
        record = self.records[index]
        path = self.image_dir / record["image"]
        try:
            image = as_rgb(path, "image")
        except BadInputError as err:
            warnings.warn(f"skipped image {path}: unreadable ({str(err).split(': ', 1)[-1]})", stacklevel=2)
            return None
        width, height = record["size"]
        regions = [{"id": rid, "box": box} for rid, box in zip(record["ids"], record["boxes"])]
        meta = {"image_id": record["image"], "width": width, "height": height, "regions": regions}
        return to_region_sample(image, meta, self.image_size, self.max_regions, train=False)
