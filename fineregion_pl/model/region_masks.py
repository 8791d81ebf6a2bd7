"""Region masks and masked pooling (paper eqs. 2-4), batched over images and regions.

Shapes: ``boxes (B, N, 4)`` xyxy pixels of the model input, ``masks (B, N, h, w)``,
``features (B, h, w, d)`` channels-last (what timm Swin gives), pooled ``z (B, N, d)``.

Geometry: the ``h x w`` feature cells tile the ``H x W`` image, cell ``(y, x)`` covering pixels
``[y H/h, (y+1) H/h] x [x W/w, (x+1) W/w]``. A region's mask value on a cell is the fraction of that
cell the region covers, so ``mask.sum()`` is the region's area measured in cells. Box masks are
separable (``M = cover_y ⊗ cover_x``); segmentation masks (COCO polygons or RLE) are rasterised at
full resolution and downsampled by area onto the same grid, so a box and the polygon of the same
box give the same mask.

No function on the model's forward path (:func:`box_masks`, :func:`masked_mean`,
:func:`merge_masks`, :func:`area_downsample`) loops over images or
regions in Python: their op count does not depend on ``B`` or ``N``. Only
:func:`rasterize_segmentations` walks the regions, because decoding COCO annotations is a
per-annotation CPU job (it belongs in the data pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

Segmentation = Union[Sequence[Sequence[float]], dict, None]
"""One region's COCO segmentation: a polygon list ``[[x0, y0, x1, y1, ...], ...]`` in pixels, an
RLE dict ``{"size": [H, W], "counts": str | bytes | list[int]}``, or ``None`` / ``[]`` (none)."""


def axis_coverage(lo: Tensor, hi: Tensor, cells: int, extent: float) -> Tensor:
    """Fraction of each of ``cells`` equal cells along one axis covered by ``[lo, hi]``.

    A reversed interval (``hi < lo``) covers nothing; a NaN end covers nothing; an infinite end
    reaches the image border.

    Args:
        lo, hi: ``(...)`` interval ends in pixels (any matching shapes, e.g. ``(B, N)``).
        cells: number of feature cells along the axis.
        extent: image size along the axis in pixels (the cells tile ``[0, extent]``).

    Returns:
        ``(..., cells)`` coverage in ``[0, 1]``.
    """
    step = extent / cells
    edges = torch.arange(cells + 1, device=lo.device, dtype=lo.dtype) * step
    start, end = edges[:-1], edges[1:]
    overlap = torch.minimum(hi[..., None], end) - torch.maximum(lo[..., None], start)
    return (torch.nan_to_num(overlap, nan=0.0) / step).clamp(0, 1)


def box_masks(boxes: Tensor, image_size: tuple[int, int], feature_size: tuple[int, int], hard: bool = False) -> Tensor:
    """Soft region masks: the fraction of each feature cell that a box covers (eq. 2 on a grid).

    ``M[b, n, y, x] = cover_y(y) * cover_x(x)``, so ``M.sum((-2, -1))`` is the box area measured
    in cells (for the part of the box inside the image). With ``hard=True`` a cell is in the mask
    when at least half of it is covered along both axes, and the cell holding the box centre always
    is, so no box of positive area inside the image gets an empty mask.

    Never NaN: reversed, zero-area and out-of-image boxes give empty (all-zero) masks, and so does a
    box with a NaN coordinate (sanitise boxes with :func:`fineregion_pl.model.boxes.sanitize_boxes` to also
    switch such regions off).

    Args:
        boxes: ``(B, N, 4)`` xyxy pixels (normally sanitised).
        image_size: ``(H, W)`` of the model input in pixels.
        feature_size: ``(h, w)`` of the feature map.
        hard: binary masks instead of fractional coverage.

    Returns:
        ``(B, N, h, w)`` masks in ``[0, 1]``, same dtype as ``boxes``.
    """
    (height, width), (h, w) = image_size, feature_size
    cover_x = axis_coverage(boxes[..., 0], boxes[..., 2], int(w), float(width))
    cover_y = axis_coverage(boxes[..., 1], boxes[..., 3], int(h), float(height))
    if hard:
        cover_x = _hard_axis(cover_x, boxes[..., 0], boxes[..., 2], int(w), float(width))
        cover_y = _hard_axis(cover_y, boxes[..., 1], boxes[..., 3], int(h), float(height))
    return cover_y[..., :, None] * cover_x[..., None, :]


def _hard_axis(cover: Tensor, lo: Tensor, hi: Tensor, cells: int, extent: float) -> Tensor:
    """Binarise one axis' coverage: cells covered at least half, plus the cell of the centre of
    the interval's part inside the image (if that part has positive length, however small)."""
    binary = (cover >= 0.5).to(cover.dtype)
    lo, hi = lo.clamp(min=0), hi.clamp(max=extent)
    has_extent = (hi > lo).to(cover.dtype)[..., None]
    centre = torch.nan_to_num((lo + hi) / 2, nan=0.0)
    centre_cell = (centre / (extent / cells)).floor().clamp(0, cells - 1).long()
    centre_hot = torch.nn.functional.one_hot(centre_cell, cells).to(cover.dtype) * has_extent
    return torch.maximum(binary, centre_hot)


def masked_mean(features: Tensor, masks: Tensor, eps: float = 0.0) -> Tensor:
    """Mask-weighted average of features for every region: ``z_i = sum(M_i * F) / sum(M_i)``.

    Eqs. 3-4 fused into one batched matmul, ``(B, N, hw) @ (B, hw, d)``: ``F ⊙ M_i`` is never
    formed, and the normalisation divides the ``(B, N, d)`` result by the mask sums rather than
    rescaling the masks. A region with an empty mask (padding) pools to zeros. The gradient with
    respect to ``features`` is the normalised mask, ``dz_i / dF[y, x] = M_i[y, x] / sum(M_i)``.

    Args:
        features: ``(B, h, w, d)`` feature map; channels-last contiguous, or a channels-first
            ``(B, d, h, w)`` map viewed as ``.permute(0, 2, 3, 1)`` (used without a copy).
        masks: ``(B, N, h, w)`` non-negative masks.
        eps: mask sums below this count as ``eps``. The default (0) averages exactly under any
            mask whose sum is a normal float (``>= torch.finfo(dtype).tiny``) and gives zeros for
            the rest, i.e. for empty masks.

    Returns:
        ``(B, N, d)`` pooled region features, dtype of ``features``.
    """
    b, h, w, d = features.shape
    weights = masks.reshape(b, masks.shape[1], h * w).to(features.dtype)
    pooled = torch.bmm(weights, _cells_by_channels(features))
    total = weights.sum(-1, keepdim=True)
    if eps > 0:
        scale = total.clamp(min=eps).reciprocal()
    else:
        tiny = torch.finfo(weights.dtype).tiny
        scale = (total >= tiny).to(total.dtype) / total.clamp(min=tiny)
    if scale.requires_grad:
        return pooled * scale
    return pooled.mul_(scale)


def _cells_by_channels(features: Tensor) -> Tensor:
    """``(B, h, w, d)`` as a ``(B, hw, d)`` matrix batch, without copying when the layout allows."""
    b, h, w, d = features.shape
    if features.is_contiguous():
        return features.view(b, h * w, d)
    channels_first = features.permute(0, 3, 1, 2)
    if channels_first.is_contiguous():
        return channels_first.view(b, d, h * w).transpose(1, 2)
    return features.reshape(b, h * w, d)


def merge_masks(segmentation: Tensor, box: Tensor) -> Tensor:
    """Segmentation mask where a region has one, its box mask otherwise.

    Args:
        segmentation: ``(B, N, h, w)`` from :func:`segmentation_masks` (all-zero where a region
            has no segmentation).
        box: ``(B, N, h, w)`` from :func:`box_masks` on the same grid.

    Returns:
        ``(B, N, h, w)``.
    """
    has_segmentation = segmentation.flatten(-2).amax(-1) > 0
    return torch.where(has_segmentation[..., None, None], segmentation.to(box.dtype), box)


def area_downsample(masks: Tensor, feature_size: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Full-resolution masks to the fraction of each feature cell they cover (area downsampling).

    Exact for any sizes, divisible or not: cell ``(y, x)`` gets the mean of the mask over the cell's
    pixel rectangle, pixels cut by a cell edge counting with the fraction inside. It is separable,
    ``A_y @ mask @ A_x^T`` with ``A`` the pixel-to-cell overlap matrices (:func:`axis_coverage` of
    every pixel), so the total area is kept: ``out.sum((-2, -1)) * (H/h) * (W/w) == mask.sum((-2, -1))``.

    Args:
        masks: ``(..., H, W)`` masks in ``[0, 1]`` (any dtype, e.g. ``uint8`` from rasterising).
        feature_size: ``(h, w)``.
        dtype: floating dtype of the result.

    Returns:
        ``(..., h, w)`` in ``[0, 1]``.
    """
    height, width = masks.shape[-2:]
    h, w = feature_size
    across_y = _pixel_to_cell(height, int(h), masks.device, dtype)
    across_x = _pixel_to_cell(width, int(w), masks.device, dtype)
    return across_y @ (masks.to(dtype) @ across_x.T)


def _pixel_to_cell(pixels: int, cells: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(cells, pixels)`` matrix: share of each pixel inside each cell, divided by the cell size."""
    lo = torch.arange(pixels, device=device, dtype=torch.float64)
    cover = axis_coverage(lo, lo + 1, cells, float(pixels))
    return cover.T.to(dtype)


def rasterize_segmentations(
    segmentations: Sequence[Sequence[Segmentation]],
    image_size: tuple[int, int],
    num_regions: Optional[int] = None,
) -> Tensor:
    """Decode COCO polygons / RLE of every region into binary full-resolution masks.

    Decoding is done by pycocotools (``frPyObjects``, ``merge``, one ``decode`` call for the whole
    batch). Coordinates are in the pixels of the image the masks are for (the model input), with
    pycocotools' convention that the polygon of the box ``[x0, y0, x1, y1]`` with integer corners
    covers exactly the pixels of that box.

    Args:
        segmentations: per image, per region a :data:`Segmentation` (``None`` or ``[]``: none).
        image_size: ``(H, W)`` in pixels; an RLE's ``size`` must equal it.
        num_regions: ``N`` (default: the most regions of any image); shorter images are padded.

    Returns:
        ``(B, N, H, W)`` ``uint8`` masks, all zero for regions without a segmentation or padding.
    """
    from pycocotools import mask as mask_utils

    height, width = int(image_size[0]), int(image_size[1])
    n = max((len(regions) for regions in segmentations), default=0) if num_regions is None else num_regions
    rles, where = [], []
    for b, regions in enumerate(segmentations):
        if len(regions) > n:
            raise ValueError(f"image {b} has {len(regions)} segmentations but num_regions={n}: pass a larger num_regions")
        for i, segmentation in enumerate(regions):
            rle = _to_rle(segmentation, height, width, f"image {b} region {i}", mask_utils)
            if rle is not None:
                rles.append(rle)
                where.append(b * n + i)
    out = torch.zeros(len(segmentations) * n, height, width, dtype=torch.uint8)
    if rles:
        decoded = mask_utils.decode(rles)
        out[torch.tensor(where)] = torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))
    return out.reshape(len(segmentations), n, height, width)


def _to_rle(segmentation: Any, height: int, width: int, where: str, mask_utils: Any) -> Optional[dict]:
    if segmentation is None or (isinstance(segmentation, (list, tuple)) and len(segmentation) == 0):
        return None
    if isinstance(segmentation, dict):
        size = [int(s) for s in segmentation.get("size", ())]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE size {size} differs from the image size [{height}, {width}]: "
                             "rasterise segmentations in the coordinates of the image they are pooled from")
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation
    polygons = [list(map(float, p)) for p in segmentation if len(p) > 0]
    bad = [p for p in polygons if len(p) < 6 or len(p) % 2]
    if bad:
        raise ValueError(f"{where}: a polygon needs an even number >= 6 of coordinates [x0, y0, x1, y1, ...], got {len(bad[0])}")
    if not polygons:
        return None
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def segmentation_masks(
    segmentations: Sequence[Sequence[Segmentation]],
    image_size: tuple[int, int],
    feature_size: tuple[int, int],
    num_regions: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Region masks from COCO segmentations: rasterised at full resolution, downsampled by area.

    Zero for regions without a segmentation (use :func:`merge_masks` to fall back to box masks).
    For several feature levels, call :func:`rasterize_segmentations` once and
    :func:`area_downsample` per level.

    Args:
        segmentations: per image, per region a :data:`Segmentation`.
        image_size: ``(H, W)`` of the model input in pixels.
        feature_size: ``(h, w)`` of the feature map.
        num_regions: ``N`` (default: the most regions of any image).
        dtype: floating dtype of the result.

    Returns:
        ``(B, N, h, w)`` fraction of each cell covered, in ``[0, 1]``.
    """
    return area_downsample(rasterize_segmentations(segmentations, image_size, num_regions), feature_size, dtype)
