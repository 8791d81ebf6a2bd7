"""Prediction input from a folder of images and a file of boxes, checked before anything runs.

The boxes file is JSON or JSONL, in pixels of the original images, in one of two forms:

- boxes per image, ``xyxy``: a JSON object ``{"a.jpg": [[x0, y0, x1, y1], ...], ...}``, or a JSON
  list / JSONL lines ``{"image": "a.jpg", "boxes": [[x0, y0, x1, y1], ...], "ids": [...], "masks": [...]}``
  (``ids`` optional: region ids default to 0, 1, ...; ``masks`` optional: per box a COCO
  segmentation, RLE or polygons, or null);
- a detector's output in the COCO results format, a JSON list of
  ``{"image_id": 42 | "file_name": "a.jpg", "bbox": [x, y, w, h], "score": 0.9, "category_id": 3}``
  (``segmentation`` optional); detections scoring below ``score_threshold`` are dropped and at
  most ``top_k`` per image kept, best first. A region's id is the detection's index in the file.
  ``file_name`` is relative to the image folder; an ``image_id`` names the file whose stem is
  that number, or ends in it (COCO's ``000000000042.jpg``, ``COCO_val2014_000000000042.jpg``).

A malformed box or mask (not four finite numbers, ``x1 <= x0`` or ``y1 <= y0``, outside its image,
an RLE of another size) stops the run before the model runs, with one line naming the file, the
image and the region. An image that is missing, unreadable or larger than ``max_pixels`` is
skipped with one warning line naming it, and counted (a truncated image found only when decoding
too, by the prediction writer's summary). Boxes are in the pixels of the upright image (EXIF
orientation applied, as the demo shows it); an image named twice, or with more than
``max_regions`` regions, is an error.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fineregion_pl.data.schemas import boxes_entries, read_json_file
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.detections import check_segmentation, regions_from_detections
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.images import as_rgb, upright_size
from fineregion_pl.model.transforms import RegionSample, collate_present, to_region_sample


def is_coco_results(entries: list) -> bool:
    """Whether a boxes file's entries are COCO results (detections with ``bbox`` or ``segmentation``)."""
    return bool(entries) and isinstance(entries[0], dict) and "image" not in entries[0] and ("bbox" in entries[0] or "segmentation" in entries[0])


def _coco_records(path: Path, entries: list) -> list[dict]:
    """COCO results grouped by image, in the order images first appear: ``{"image" | "image_id", "detections", "ids"}``."""
    grouped: dict[Any, dict] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadInputError(f"{path}: detection {index} is not an object")
        if isinstance(entry.get("file_name"), str):
            key = ("file_name", entry["file_name"])
        elif isinstance(entry.get("image_id"), (int, str)) and not isinstance(entry.get("image_id"), bool):
            key = ("image_id", entry["image_id"])
        else:
            raise BadInputError(f"{path}: detection {index} has neither 'image_id' nor 'file_name'")
        record = grouped.setdefault(key, {"image" if key[0] == "file_name" else "image_id": key[1], "detections": [], "ids": []})
        record["detections"].append(entry)
        record["ids"].append(index)
    return list(grouped.values())


def read_boxes_file(path: str | Path) -> list[dict]:
    """Records of a boxes file: ``{"image", "boxes", "ids", "masks"}`` (every box checked), or for a
    COCO results file ``{"image" | "image_id", "detections", "ids"}`` (checked with the image's size)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"boxes file not found: {path}")
    entries = read_json_file(path, "boxes file")  # a JSON value, or a JSONL file's lines: validated below
    if isinstance(entries, list) and is_coco_results(entries):
        return _coco_records(path, entries)
    records = []
    for entry in boxes_entries(entries, path):
        name, boxes = entry.image, entry.boxes
        ids = entry.ids if entry.ids is not None else list(range(len(boxes)))
        if len(ids) != len(boxes):
            raise BadInputError(f"{path}: image {name!r} has {len(boxes)} boxes but {len(ids)} ids")
        masks = entry.masks or [None] * len(boxes)
        if not isinstance(masks, list) or len(masks) != len(boxes):
            raise BadInputError(f"{path}: image {name!r} has {len(boxes)} boxes but 'masks' is not a list of {len(boxes)} (null for no mask)")
        checked = [check_box(b, f"{path}: image {name!r} region {rid}") for b, rid in zip(boxes, ids)]
        records.append({"image": name, "boxes": checked, "ids": list(ids), "masks": masks})
    return records


def image_ids_of_folder(folder: Path) -> dict[str, list[str]]:
    """``{str(number): [file names]}`` for the folder's files: by stem, and by the number a stem ends in."""
    names: dict[str, list[str]] = {}
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        keys = {file.stem}
        digits = re.search(r"(\d+)$", file.stem)
        if digits:
            keys.add(str(int(digits.group(1))))
        for key in keys:
            names.setdefault(key, []).append(file.name)
    return names


def collate_user_regions(samples: list[Optional[RegionSample]]) -> Optional[dict[str, Any]]:
    """:func:`~fineregion_pl.model.transforms.collate_present` (images that would not decode left
    out; ``None`` when all were), with the user's masks pooled."""
    batch = collate_present(samples)
    if batch is not None:
        batch["pool_segmentations"] = True
    return batch


class ImageBoxesDataset(Dataset):
    """Images of a folder with the boxes of a boxes file, as :class:`RegionSample` items.

    Every image is probed (its header only) when the dataset is made: missing, unreadable and
    oversized images are skipped with a warning and counted in ``skipped``; a box outside its
    image by more than ``box_tolerance`` pixels is an error naming it. Boxes within the
    tolerance are clamped.

    Args:
        image_dir: folder the boxes file's image names are relative to.
        boxes_file: JSON or JSONL boxes file, or COCO results (see the module docstring).
        image_size: side of the letterboxed model input.
        max_regions: at most this many regions per image (the first ones).
        max_pixels: larger images are skipped (decompression-bomb guard).
        box_tolerance: how far (pixels) a box may stick out of its image.
        score_threshold: COCO results: detections scoring below it are dropped.
        top_k: COCO results: at most this many detections per image, best first.
    """

    def __init__(
        self,
        image_dir: str | Path,
        boxes_file: str | Path,
        image_size: int,
        max_regions: int = 1000,
        max_pixels: int = 100_000_000,
        box_tolerance: float = 2.0,
        score_threshold: float = 0.0,
        top_k: Optional[int] = None,
    ):
        self.image_dir, self.boxes_file = Path(image_dir), Path(boxes_file)
        if not self.image_dir.is_dir():
            raise BadInputError(f"image folder not found: {self.image_dir}")
        self.image_size, self.max_regions, self.max_pixels = image_size, max_regions, max_pixels
        self.skipped: dict[str, int] = {}
        self.records = []
        folder_ids: Optional[dict[str, list[str]]] = None
        for record in read_boxes_file(self.boxes_file):
            if "image_id" in record:
                folder_ids = image_ids_of_folder(self.image_dir) if folder_ids is None else folder_ids
                name = self._image_of_id(record["image_id"], folder_ids)
                if name is None:
                    continue
                record["image"] = name
            size = self._probe(record["image"])
            if size is None:
                continue
            where = f"{self.boxes_file}: image {record['image']!r}"
            if "detections" in record:
                regions = regions_from_detections(record["detections"], where, size[0], size[1], score_threshold, top_k, ids=record["ids"])
            else:
                regions = [{"id": rid, "box": box, "segmentation": check_segmentation(mask, size[0], size[1], f"{where} region {rid}")}
                           for rid, box, mask in zip(record["ids"], record["boxes"], record["masks"])]
            if len(regions) > max_regions:
                raise BadInputError(f"{where} has {len(regions)} boxes, more than max_regions={max_regions} "
                                    "(--data.predict_max_regions): raise it or split the image's boxes")
            for region in regions:
                region["box"] = self._inside(record["image"], region["id"], region["box"], size, box_tolerance)
            self.records.append({"image": record["image"], "size": size, "regions": regions})

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        warnings.warn(message, stacklevel=3)

    def _image_of_id(self, image_id: Any, folder_ids: dict[str, list[str]]) -> Optional[str]:
        names = folder_ids.get(str(image_id).lstrip("0") or "0", []) or folder_ids.get(str(image_id), [])
        if len(names) > 1:
            raise BadInputError(f"{self.boxes_file}: image_id {image_id} matches several files in {self.image_dir}: {', '.join(names[:3])}; give 'file_name' instead")
        if not names:
            self._skip("missing_image", f"skipped image_id {image_id}: no file in {self.image_dir} is named by that number")
            return None
        return names[0]

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

    def _inside(self, image: str, rid: Any, box: list[float], size: tuple[int, int], tol: float) -> list[float]:
        x0, y0, x1, y1 = box
        width, height = size
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise BadInputError(f"{self.boxes_file}: image {image!r} region {rid} box {[float(v) for v in box]} is outside the {width}x{height} image")
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
        meta = {"image_id": record["image"], "width": width, "height": height, "regions": record["regions"]}
        return to_region_sample(image, meta, self.image_size, self.max_regions, train=False)
