"""Regions as people have them: a detector's boxes in the COCO results format, and segmentation masks.

A COCO results file is a JSON list with one object per detection::

    [{"image_id": 42, "bbox": [x, y, w, h], "score": 0.93, "category_id": 18}, ...]

(``file_name`` may stand in for ``image_id``; ``segmentation``, a COCO RLE or polygon list, may
come with the box or replace it). :func:`regions_from_detections` turns one image's detections
into the package's regions (``xyxy`` pixel boxes, an optional mask each), keeping those with
``score >= score_threshold``, the ``top_k`` best first. :func:`check_segmentation` checks a mask
before anything decodes it: pycocotools trusts an RLE's counts and writes past its buffer when
they add up to more than the image, so a malformed mask must stop here, not crash a worker.

Every problem is a :class:`~fineregion_pl.model.errors.BadInputError` naming the detection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from fineregion_pl.model.boxes import four_numbers
from fineregion_pl.model.errors import BadInputError

Region = dict[str, Any]  # {"id", "box": [x0, y0, x1, y1], "segmentation", "detector_score", "detector_category_id"}


def rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (the inverse of pycocotools' ``rleToString``).

    Raises ``ValueError`` on a string that is not a complete encoding.
    """
    values: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("the counts string ends inside a number")
            char = ord(counts[position]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"character {counts[position]!r} is not part of a COCO RLE string")
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def check_segmentation(segmentation: Any, width: int, height: int, where: str) -> Any:
    """A region's COCO segmentation (RLE for a ``width`` x ``height`` image, or polygons in its pixels), checked.

    Returns the segmentation (``None`` for ``None`` or ``[]``); raises a ``BadInputError``
    naming ``where`` when it is malformed, of another image size, or its runs do not cover the image.
    """
    if segmentation is None or (isinstance(segmentation, list) and not segmentation):
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            raise BadInputError(f"{where}: an RLE mask needs 'size': [height, width], got {size!r}")
        if size != [height, width]:
            raise BadInputError(f"{where}: the RLE mask is {size[1]}x{size[0]} (size [h, w] = {size}) but the image is {width}x{height}")
        if isinstance(counts, str):
            try:
                runs = rle_string_counts(counts)
            except ValueError as err:
                raise BadInputError(f"{where}: the RLE mask's counts are not a COCO RLE string ({err})") from None
        elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            runs = counts
        else:
            raise BadInputError(f"{where}: an RLE mask's 'counts' must be a COCO RLE string or a list of integers")
        if any(v < 0 for v in runs) or sum(runs) != width * height:
            raise BadInputError(f"{where}: the RLE mask's runs cover {sum(runs)} pixels, not the image's {width * height}")
        return {"size": size, "counts": counts}
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        for number, polygon in enumerate(segmentation):
            try:
                values = [float(v) for v in polygon]
            except (TypeError, ValueError):
                raise BadInputError(f"{where}: polygon {number} is not a list of numbers") from None
            if len(values) < 6 or len(values) % 2:
                raise BadInputError(f"{where}: polygon {number} has {len(values)} coordinates; a polygon needs an even number >= 6 [x0, y0, x1, y1, ...]")
            if not all(math.isfinite(v) for v in values):
                raise BadInputError(f"{where}: polygon {number} has a non-finite coordinate")
        return [[float(v) for v in polygon] for polygon in segmentation]
    raise BadInputError(f"{where}: a mask must be a COCO RLE {{'size': [h, w], 'counts': ...}} or a list of polygons [[x0, y0, x1, y1, ...], ...]")


def segmentation_box(segmentation: Any, width: int, height: int) -> list[float]:
    """The ``xyxy`` bounding box of a checked segmentation (pycocotools ``toBbox``)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) else dict(segmentation, counts=segmentation["counts"].encode("ascii"))
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return [x, y, x + w, y + h]


def _xywh(bbox: Any, where: str) -> list[float]:
    values, problem = four_numbers(bbox)
    if problem:
        raise BadInputError(f"{where}: 'bbox' {problem} [x, y, w, h]: {bbox!r}" if "four" in problem else f"{where}: 'bbox' {problem}: {bbox!r}")
    x, y, w, h = values
    if w <= 0 or h <= 0:
        raise BadInputError(f"{where}: 'bbox' [x, y, w, h] has {'w' if w <= 0 else 'h'} <= 0: {bbox!r}")
    return [x, y, x + w, y + h]


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{where}: {name!r} is not a finite number: {value!r}")
    return float(value)


def regions_from_detections(
    detections: Sequence[Any],
    where: str,
    width: Optional[int] = None,
    height: Optional[int] = None,
    score_threshold: float = 0.0,
    top_k: Optional[int] = None,
    ids: Optional[Sequence[Any]] = None,
) -> list[Region]:
    """One image's detections (COCO results objects) as regions, best score first.

    Args:
        detections: objects with ``bbox`` ``[x, y, w, h]`` and/or ``segmentation``, and optional
            ``score`` (default 1) and ``category_id``.
        where: names the source in messages (a file, a request).
        width, height: the image's size; needed to check masks (without them a mask is an error).
        score_threshold: detections scoring below it are dropped.
        top_k: at most this many detections are kept (the best scores).
        ids: region id of each detection (default: its index in ``detections``).

    Returns:
        ``{"id", "box", "segmentation", "detector_score", "detector_category_id"}`` per kept detection.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise BadInputError(f"{where}: top_k must be a positive integer, got {top_k!r}")
    threshold = _number(score_threshold, "score_threshold", where)
    regions = []
    for index, detection in enumerate(detections):
        rid = index if ids is None else ids[index]
        here = f"{where} detection {rid}"
        if not isinstance(detection, dict):
            raise BadInputError(f"{here} is not an object with 'bbox' [x, y, w, h]")
        if "bbox" not in detection and "segmentation" not in detection:
            raise BadInputError(f"{here} has neither 'bbox' [x, y, w, h] nor 'segmentation'")
        score = _number(detection.get("score", 1.0), "score", here)
        segmentation = detection.get("segmentation")
        if segmentation is not None:
            if width is None or height is None:
                raise BadInputError(f"{here} has a segmentation but the image size is not known")
            segmentation = check_segmentation(segmentation, width, height, here)
        if "bbox" in detection:
            box = _xywh(detection["bbox"], here)
        elif segmentation is not None:
            box = segmentation_box(segmentation, width, height)
            if box[2] <= box[0] or box[3] <= box[1]:
                raise BadInputError(f"{here} has an empty segmentation and no 'bbox'")
        else:
            raise BadInputError(f"{here} has neither 'bbox' [x, y, w, h] nor 'segmentation'")
        if score >= threshold:
            regions.append({"id": rid, "box": box, "segmentation": segmentation, "detector_score": score,
                            "detector_category_id": detection.get("category_id")})
    regions.sort(key=lambda r: -r["detector_score"])  # stable: ties keep the file's order
    return regions[:top_k] if top_k is not None else regions
