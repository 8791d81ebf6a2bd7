"""Region masks and masked pooling (paper eqs. 2-4), batched over images and regions.

Shapes: ``boxes (B, N, 4)`` xyxy pixels of the model input, ``masks (B, N, h, w)``,
``features (B, h, w, d)`` channels-last (what timm Swin gives), pooled ``z (B, N, d)``.
No function here loops over images or regions in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_coverage(lo: Tensor, hi: Tensor, cells: int, extent: float) -> Tensor:
    """Fraction of each of ``cells`` equal cells along one axis covered by ``[lo, hi]``.

    Args:
        lo, hi: ``(B, N)`` interval ends in pixels.
        cells: number of feature cells along the axis.
        extent: image size along the axis in pixels (the cells tile ``[0, extent]``).

    Returns:
        ``(B, N, cells)`` coverage in ``[0, 1]``.
    """
    step = extent / cells
    edges = torch.arange(cells + 1, device=lo.device, dtype=lo.dtype) * step
    start, end = edges[:-1], edges[1:]
    overlap = torch.minimum(hi[..., None], end) - torch.maximum(lo[..., None], start)
    return overlap.clamp(min=0) / step


def box_masks(boxes: Tensor, image_size: tuple[int, int], feature_size: tuple[int, int], hard: bool = False) -> Tensor:
    """Soft region masks: the fraction of each feature cell that a box covers (eq. 2 on a grid).

    ``M[b, n, y, x] = cover_y(y) * cover_x(x)``, so ``M.sum((-2, -1))`` is the box area measured
    in cells. With ``hard=True`` a cell is in the mask when at least half of it is covered along
    both axes; a box smaller than that keeps the cell holding its centre, so no valid box gets an
    empty mask.

    Args:
        boxes: ``(B, N, 4)`` xyxy pixels, already sanitised (finite, inside the image).
        image_size: ``(H, W)`` of the model input in pixels.
        feature_size: ``(h, w)`` of the feature map.
        hard: binary masks instead of fractional coverage.

    Returns:
        ``(B, N, h, w)`` masks, same dtype as ``boxes``.
    """
    (height, width), (h, w) = image_size, feature_size
    cover_x = axis_coverage(boxes[..., 0], boxes[..., 2], w, float(width))
    cover_y = axis_coverage(boxes[..., 1], boxes[..., 3], h, float(height))
    if hard:
        cover_x = _hard_axis(cover_x, (boxes[..., 0] + boxes[..., 2]) / 2, w, float(width))
        cover_y = _hard_axis(cover_y, (boxes[..., 1] + boxes[..., 3]) / 2, h, float(height))
    return cover_y[..., :, None] * cover_x[..., None, :]


def _hard_axis(cover: Tensor, centre: Tensor, cells: int, extent: float) -> Tensor:
    binary = (cover >= 0.5).to(cover.dtype)
    centre_cell = (centre / (extent / cells)).floor().long().clamp(0, cells - 1)
    has_extent = (cover.sum(-1, keepdim=True) > 0).to(cover.dtype)
    centre_hot = torch.nn.functional.one_hot(centre_cell, cells).to(cover.dtype) * has_extent
    return torch.maximum(binary, centre_hot)


def masked_mean(features: Tensor, masks: Tensor, eps: float = 1e-6) -> Tensor:
    """Mask-weighted average of features for every region: ``z_i = sum(M_i * F) / sum(M_i)``.

    Eqs. 3-4 fused into one batched matmul: ``F ⊙ M_i`` is never formed. A region with an empty
    mask (padding) pools to zeros.

    Args:
        features: ``(B, h, w, d)`` channels-last feature map.
        masks: ``(B, N, h, w)`` non-negative masks.

    Returns:
        ``(B, N, d)`` pooled region features.
    """
    b, h, w, d = features.shape
    weights = masks.reshape(b, masks.shape[1], h * w)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=eps)
    return torch.bmm(weights.to(features.dtype), features.reshape(b, h * w, d))
