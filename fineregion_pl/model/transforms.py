"""Per-sample transforms: letterbox resize of the image with its boxes, region sampling, caption choice."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RegionSample:
    """One image and all its (kept) regions, ready for collation.

    ``boxes`` are xyxy pixels of the letterboxed ``image`` (content at the top-left, padding at
    the right/bottom); ``scale`` maps them back to the original image (``original = box / scale``).
    """

    image: torch.Tensor  # (3, S, S) normalised
    boxes: torch.Tensor  # (n, 4)
    categories: torch.Tensor  # (n,) long, -1 when unknown
    captions: list[str]  # the training target of each region
    references: list[list[str]]  # all reference sentences of each region
    region_ids: list[Any]
    referring: list[list[str]]
    questions: list[dict]
    image_id: Any
    scale: float
    size: tuple[int, int]  # original (width, height)
    segmentations: list = None  # per region: COCO polygons / RLE in model-input pixels, or None
    vision_questions: list = None  # one-anchor questions ("what is left of the red square?"), where the data has them


def letterbox(image: Image.Image, size: int) -> tuple[torch.Tensor, float]:
    """Resize so the longer side is ``size``, pad right/bottom to ``size x size``, normalise.

    Returns the ``(3, size, size)`` tensor and the scale applied to the image (and so to boxes).
    The image is read by :func:`fineregion_pl.model.images.as_rgb`, as at every front door.
    """
    from fineregion_pl.model.images import as_rgb

    image = as_rgb(image)
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    canvas[:new_h, :new_w] = np.asarray(image, dtype=np.float32) / 255.0
    canvas[:new_h, :new_w] = (canvas[:new_h, :new_w] - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), scale


def scale_segmentation(segmentation: Any, sx: float, sy: float, width: int, height: int) -> Any:
    """Scale a COCO segmentation (polygons, or RLE compressed or not) to a ``width x height`` image."""
    if segmentation is None or (sx == 1.0 and sy == 1.0):
        return segmentation
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        return [[round(v * (sx if i % 2 == 0 else sy), 3) + 0.0 for i, v in enumerate(polygon)] for polygon in segmentation]
    h, w = segmentation["size"]
    rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list) else dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    mask = Image.fromarray(mask_utils.decode(rle) * 255).resize((width, height), Image.NEAREST)
    out = mask_utils.encode(np.asfortranarray((np.asarray(mask) > 127).astype(np.uint8)))
    return {"size": [int(out["size"][0]), int(out["size"][1])], "counts": out["counts"].decode("ascii")}


def letterbox_segmentation(segmentation: Any, scale: float, canvas: int) -> Any:
    """A region's COCO segmentation in the pixels of the letterboxed ``canvas x canvas`` input
    (:func:`letterbox`): scaled by ``scale`` (:func:`scale_segmentation`), an RLE padded to the canvas."""
    if not segmentation:
        return None
    if not isinstance(segmentation, dict):
        return scale_segmentation([p for p in segmentation if len(p) >= 6], scale, scale, canvas, canvas)
    from pycocotools import mask as mask_utils

    height, width = segmentation["size"]
    scaled = scale_segmentation(segmentation, scale, scale, max(1, round(width * scale)), max(1, round(height * scale)))
    rle = mask_utils.frPyObjects(scaled, *scaled["size"]) if isinstance(scaled["counts"], list) else dict(scaled)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    mask = mask_utils.decode(rle)
    padded = np.zeros((canvas, canvas), dtype=np.uint8)
    padded[: min(mask.shape[0], canvas), : min(mask.shape[1], canvas)] = mask[:canvas, :canvas]
    encoded = mask_utils.encode(np.asfortranarray(padded))
    return {"size": [canvas, canvas], "counts": encoded["counts"].decode("ascii")}


def to_region_sample(
    image: Image.Image,
    record: dict,
    image_size: int,
    max_regions: int,
    train: bool,
    rng: Optional[random.Random] = None,
    category_map: Optional[list[int]] = None,
) -> RegionSample:
    """Turn a decoded shard sample (PIL image, JSON record) into a :class:`RegionSample`.

    At most ``max_regions`` regions are kept: a random subset when training, the first ones
    otherwise. When training, only regions with a caption are kept, and each region's caption
    is drawn at random from its captions; otherwise every region is kept (its caption is the
    first reference, or empty when it has none, as in prediction).
    ``category_map`` maps the shard set's ``category_id`` to the DataModule's joint category list.
    """
    rng = rng or random
    regions = [r for r in record.get("regions", []) if r.get("captions") or not train]
    if len(regions) > max_regions:
        if not train:  # evaluation must not lose regions unseen: say how many and which option
            warnings.warn(f"image {record.get('image_id')!r} has {len(regions)} regions: only the first {max_regions} are used "
                          f"(max_regions={max_regions}; raise --data.max_regions to use them all)", stacklevel=2)
        regions = rng.sample(regions, max_regions) if train else regions[:max_regions]
    tensor, scale = letterbox(image, image_size)
    boxes = torch.tensor([r["box"] for r in regions], dtype=torch.float32).reshape(-1, 4) * scale
    ids = [r.get("category_id") if r.get("category_id") is not None else -1 for r in regions]
    if category_map is not None:
        ids = [category_map[i] if 0 <= i < len(category_map) else -1 for i in ids]
    categories = torch.tensor(ids, dtype=torch.long)
    captions = [rng.choice(r["captions"]) if train else (r.get("captions") or [""])[0] for r in regions]
    return RegionSample(
        image=tensor,
        boxes=boxes,
        categories=categories,
        captions=captions,
        references=[list(r.get("captions", [])) for r in regions],
        region_ids=[r["id"] for r in regions],
        referring=[list(r.get("referring", [])) for r in regions],
        questions=list(record.get("questions", [])),
        image_id=record.get("image_id"),
        scale=scale,
        size=(int(record.get("width") or image.width), int(record.get("height") or image.height)),
        segmentations=[letterbox_segmentation(r.get("segmentation"), scale, image_size) for r in regions],
        vision_questions=list(record.get("vision_questions", [])),
    )


def collate_present(samples: list[Optional[RegionSample]]) -> Optional[dict[str, Any]]:
    """:func:`collate_regions` of the samples that are not ``None`` (images skipped when they would
    not decode, already warned about and counted); ``None`` when the whole batch was skipped."""
    kept = [s for s in samples if s is not None]
    return collate_regions(kept) if kept else None


def collate_regions(samples: list[RegionSample]) -> dict[str, Any]:
    """Batch samples, padding regions to the largest count in the batch.

    Returns a dict with ``images (B, 3, S, S)``, ``boxes (B, N, 4)`` (zeros where padded),
    ``region_valid (B, N)`` bool, ``categories (B, N)`` (-1 where padded or unknown), and the
    per-image lists ``captions``, ``references``, ``region_ids``, ``referring``, ``questions``,
    ``vision_questions``, ``segmentations``, ``image_ids``, ``scales``, ``sizes``.
    """
    b = len(samples)
    n = max([len(s.region_ids) for s in samples] + [1])
    boxes = torch.zeros(b, n, 4)
    valid = torch.zeros(b, n, dtype=torch.bool)
    categories = torch.full((b, n), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s.region_ids)
        boxes[i, :k] = s.boxes
        valid[i, :k] = True
        categories[i, :k] = s.categories
    return {
        "images": torch.stack([s.image for s in samples]),
        "boxes": boxes,
        "region_valid": valid,
        "categories": categories,
        "captions": [s.captions for s in samples],
        "references": [s.references for s in samples],
        "region_ids": [s.region_ids for s in samples],
        "referring": [s.referring for s in samples],
        "questions": [s.questions for s in samples],
        "vision_questions": [s.vision_questions or [] for s in samples],
        "image_ids": [s.image_id for s in samples],
        "segmentations": [s.segmentations or [None] * len(s.region_ids) for s in samples],
        "scales": torch.tensor([s.scale for s in samples]),
        "sizes": torch.tensor([s.size for s in samples], dtype=torch.float32),
    }
