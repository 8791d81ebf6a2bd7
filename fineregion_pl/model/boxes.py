"""Box operations on absolute pixel ``xyxy`` boxes (the package's only box convention).

Every function is pure and batched: ``boxes`` is ``(..., 4)`` with ``x0, y0, x1, y1`` in pixels.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fineregion_pl.model.errors import BadInputError


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


def matched_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of ``a (K, 4)`` and ``b (K, 4)`` xyxy (torchvision's ``box_iou``, diagonal); 0 where the union is empty."""
    from torchvision.ops import box_iou

    if a.shape[0] == 0:
        return a.new_zeros(0)
    return torch.nan_to_num(box_iou(a, b).diagonal(), nan=0.0)


def check_box(box: Any, where: str) -> list[float]:
    """A user's ``[x0, y0, x1, y1]`` as four finite floats with ``x0 < x1`` and ``y0 < y1``.

    Raises a :class:`~fineregion_pl.model.errors.BadInputError` naming ``where`` otherwise.
    """
    values, problem = four_numbers(box)
    if problem:
        raise BadInputError(f"{where} {problem} [x0, y0, x1, y1]: {box!r}" if "four" in problem else f"{where} {problem}: {box!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0:
        raise BadInputError(f"{where} has x1 <= x0 ({x1} <= {x0})")
    if y1 <= y0:
        raise BadInputError(f"{where} has y1 <= y0 ({y1} <= {y0})")
    return values


def box_list(boxes: Any, where: str) -> list[Any]:
    """A user's boxes of one image as a list of rows: a list/tuple of boxes, or an ``(n, 4)``
    numpy array or tensor (``.tolist()``); each row is checked later by :func:`check_box`.
    ``None``, a string or a bare number is a one-line :class:`BadInputError` naming ``where``."""
    if hasattr(boxes, "tolist") and not isinstance(boxes, (list, tuple)):
        boxes = boxes.tolist()
        if boxes and not isinstance(boxes[0], list):  # one flat box of shape (4,)
            raise BadInputError(f"{where}: boxes must be a list of [x0, y0, x1, y1] (shape (n, 4)), got one flat box {boxes!r}")
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, (list, tuple)):
        raise BadInputError(f"{where}: boxes must be a list of [x0, y0, x1, y1], an (n, 4) array or tensor, not {type(boxes).__name__}")
    return list(boxes)


def four_numbers(box: Any) -> tuple[list[float], str]:
    """``(values, "")`` for a list/tuple of four finite numbers, else ``([], problem)`` where
    ``problem`` completes "region 3 ..." (``is not four numbers`` / ``has a non-finite value``).

    Only real numbers count (ints, floats, numpy scalars; not ``bool``): a string such as ``"5"``
    is never read as a coordinate, and ``"5599"`` is not four digits of a box."""
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        return [], "is not four numbers"
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box):
        return [], "is not four numbers"
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        return [], "has a non-finite value"
    return values, ""


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
