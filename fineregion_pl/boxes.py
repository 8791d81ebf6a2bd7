"""Box operations on absolute pixel ``xyxy`` boxes (the package's only box convention).

Every function is pure and batched: ``boxes`` is ``(..., 4)`` with ``x0, y0, x1, y1`` in pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sanitize_boxes(boxes: Tensor, region_valid: Tensor, width: Tensor | float, height: Tensor | float) -> tuple[Tensor, Tensor]:
    """Clamp boxes to the image and mark the unusable ones invalid.

    Args:
        boxes: ``(B, N, 4)`` xyxy pixels; may hold NaN/inf, reversed or out-of-image boxes.
        region_valid: ``(B, N)`` bool.
        width, height: image size in pixels, a number or ``(B,)``.

    Returns:
        ``(boxes, region_valid)``: finite boxes inside ``[0, W] x [0, H]`` with ``x0 <= x1`` and
        ``y0 <= y1``, and validity with every box of zero area after clamping (or non-finite
        before) switched off. Invalid boxes are replaced by a zero box, so nothing downstream
        sees a NaN.
    """
    width = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device).reshape(-1, *([1] * (boxes.dim() - 2)))
    height = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device).reshape(-1, *([1] * (boxes.dim() - 2)))
    finite = torch.isfinite(boxes).all(dim=-1)
    safe = torch.where(torch.isfinite(boxes), boxes, torch.zeros_like(boxes))
    x0 = torch.minimum(safe[..., 0], safe[..., 2]).clamp(min=0)
    x1 = torch.maximum(safe[..., 0], safe[..., 2])
    y0 = torch.minimum(safe[..., 1], safe[..., 3]).clamp(min=0)
    y1 = torch.maximum(safe[..., 1], safe[..., 3])
    x0, x1 = torch.minimum(x0, width), torch.minimum(x1, width).clamp(min=0)
    y0, y1 = torch.minimum(y0, height), torch.minimum(y1, height).clamp(min=0)
    out = torch.stack([x0, y0, x1, y1], dim=-1)
    valid = region_valid.bool() & finite & (x1 > x0) & (y1 > y0)
    out = torch.where(valid[..., None], out, torch.zeros_like(out))
    return out, valid


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes, zero for reversed boxes."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_intersection(boxes: Tensor) -> Tensor:
    """Intersection areas between all box pairs of each image: ``(B, N, 4) -> (B, N, N)``."""
    lo = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    hi = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = (hi - lo).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching boxes ``a`` and ``b`` (same shape ``(..., 4)``); 0 where the union is empty."""
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=-1)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def box_geometry(boxes: Tensor, width: Tensor, height: Tensor) -> Tensor:
    """Normalised geometry features of boxes, ``(B, N, 4) -> (B, N, 7)``.

    ``[x0/W, y0/H, x1/W, y1/H, w/W, h/H, sqrt(area/(W*H))]``, each in ``[0, 1]`` for boxes inside
    the image. Used by the adaptive region prompt.
    """
    scale = torch.stack([width, height, width, height], dim=-1).to(boxes.dtype)[:, None, :]
    norm = boxes / scale
    wh = norm[..., 2:] - norm[..., :2]
    area = (wh[..., :1] * wh[..., 1:]).clamp(min=0).sqrt()
    return torch.cat([norm, wh, area], dim=-1)
