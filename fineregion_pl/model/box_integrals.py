"""Box pooling by summed-area tables: the soft-coverage masked mean of a box without its mask.

For an axis-aligned box, the soft mask of :func:`~fineregion_pl.model.region_masks.box_masks` is
the fraction of each feature cell the box covers, so ``sum(M * F)`` is the integral of the
piecewise-constant feature map over the box (clamped to the image), and ``sum(M)`` the box's area
in cells. The integral of a piecewise-constant map over ``[0, u] x [0, v]`` is bilinear in
``(u, v)`` inside each cell, so bilinear interpolation of the padded integral image
``I[i, j] = sum_{y < i, x < j} F[y, x]`` at the fractional box corners is exact, and

    z = (S(u1, v1) - S(u0, v1) - S(u1, v0) + S(u0, v0)) / ((u1 - u0) (v1 - v0))

with 16 weighted lookups of ``I`` per region (4 corners x 4 bilinear neighbours), done by one
``embedding_bag`` per level. The integral image is accumulated in float64: its entries grow with
the number of cells while a small box is the difference of four of them.

Shapes as in :mod:`fineregion_pl.model.region_masks`: ``features (B, h, w, d)`` channels-last,
``boxes (B, N, 4)`` xyxy pixels of the model input, pooled ``(B, N, d)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fineregion_pl.model.region_masks import box_masks, masked_mean

INTEGRAL_MIN_REGIONS = 256
"""Region slots per image from which the model takes the summed-area path (when it is exact).

Dense pooling costs ``2 N`` multiply-adds per feature element at matmul speed; the summed-area
table costs a fixed number of memory-bound float64 passes over the features, whatever ``N``.
Measured on the project's 2-core CPU at Osprey's four levels (B=8, 384 px), the table path took
~0.5 s against ~0.08 s dense at N=32 and ~0.2 s dense at N=128: below a few hundred regions per
image the dense matmul is the faster exact path, so it stays the default there.
"""


class _IntegralImage(torch.autograd.Function):
    """``(B, h, w, d)`` -> padded ``(B, h + 1, w + 1, d)`` float64 integral image; backward is the
    adjoint (suffix sums of the gradient). Row by row adds on slices: torch's CPU ``cumsum`` scans
    with a stride over a non-last dimension and is several times slower."""

    @staticmethod
    def forward(ctx, features: Tensor) -> Tensor:
        ctx.dtype = features.dtype
        b, h, w, d = features.shape
        out = features.new_zeros(b, h + 1, w + 1, d, dtype=torch.float64)
        out[:, 1:, 1:] = features
        for i in range(2, h + 1):
            out[:, i, 1:].add_(out[:, i - 1, 1:])
        for j in range(2, w + 1):
            out[:, 1:, j].add_(out[:, 1:, j - 1])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        g = grad[:, 1:, 1:].to(torch.float64, copy=True)
        h, w = g.shape[1:3]
        for i in range(h - 2, -1, -1):
            g[:, i].add_(g[:, i + 1])
        for j in range(w - 2, -1, -1):
            g[:, :, j].add_(g[:, :, j + 1])
        return g.to(ctx.dtype)


def integral_image(features: Tensor) -> Tensor:
    """Padded float64 integral image: ``I[b, i, j] = sum_{y < i, x < j} features[b, y, x]``, ``(B, h + 1, w + 1, d)``."""
    return _IntegralImage.apply(features)


def _axis_lookups(lo: Tensor, hi: Tensor, cells: int, extent: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per box and axis: the 4 integral-image indices and signed bilinear weights of its two ends
    (in cells, clamped to ``[0, cells]``), and the covered length in cells (0 when empty or NaN)."""
    scale = cells / extent
    lo = (lo.double() * scale).clamp(0, cells)
    hi = (hi.double() * scale).clamp(0, cells)
    length = torch.nan_to_num(hi - lo, nan=0.0).clamp(min=0)
    ends = torch.nan_to_num(torch.stack([lo, hi], -1), nan=0.0)  # (..., 2)
    cell = ends.floor().clamp(max=cells - 1)
    frac = ends - cell
    index = torch.stack([cell, cell + 1], -1).long()  # (..., 2 ends, 2 neighbours)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=lo.device)[:, None]
    weight = torch.stack([1 - frac, frac], -1) * sign
    return index.flatten(-2), weight.flatten(-2), length


def box_means(features: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Soft-coverage masked mean of every box on one level, from its integral image.

    Equal (to rounding) to ``masked_mean(features, box_masks(boxes, image_size, (h, w)))``, the
    empty-mask rule included: reversed, zero-area, NaN and out-of-image boxes pool to zeros.

    Args:
        features: ``(B, h, w, d)`` channels-last feature map.
        boxes: ``(B, N, 4)`` xyxy pixels.
        image_size: ``(H, W)`` of the model input.

    Returns:
        ``(B, N, d)`` in the dtype of ``features``.
    """
    b, h, w, d = features.shape
    n = boxes.shape[1]
    height, width = image_size
    rows, row_w, len_y = _axis_lookups(boxes[..., 1], boxes[..., 3], h, float(height))
    cols, col_w, len_x = _axis_lookups(boxes[..., 0], boxes[..., 2], w, float(width))
    area = len_y * len_x
    tiny = torch.finfo(features.dtype if features.is_floating_point() else torch.float32).tiny
    scale = (area >= tiny).double() / area.clamp(min=tiny)
    weights = (row_w[..., :, None] * col_w[..., None, :] * scale[..., None, None]).reshape(b * n, 16)
    offset = torch.arange(b, device=boxes.device)[:, None, None, None] * ((h + 1) * (w + 1))
    index = (offset + rows[..., :, None] * (w + 1) + cols[..., None, :]).reshape(b * n, 16)
    table = integral_image(features).view(b * (h + 1) * (w + 1), d)
    pooled = F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")
    return pooled.view(b, n, d).to(features.dtype)


def integrals_exact(pooling: str, hard: bool, mask_transform: object, segmentations: Optional[Tensor]) -> bool:
    """Whether :func:`box_means` gives exactly what the dense path would: soft box masks, mask
    pooling, no mask perturbation (dynamic masking's dilation/erosion/mixing) and no segmentation."""
    return pooling == "mask" and not hard and mask_transform is None and segmentations is None


def use_integrals(features: Sequence[Tensor], boxes: Tensor, exact: bool) -> bool:
    """The model's rule: summed-area tables when they are exact (:func:`integrals_exact`) and the
    images have at least :data:`INTEGRAL_MIN_REGIONS` region slots each; the dense matmul otherwise."""
    return exact and boxes.shape[1] >= INTEGRAL_MIN_REGIONS and all(f.is_floating_point() for f in features)


def pool_levels(features: Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int],
                masks: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Every level pooled into one preallocated ``(B, N, sum d)`` output (no per-level outputs
    alive together, no ``torch.cat``): :func:`box_means` when ``masks`` is ``None``, else
    :func:`~fineregion_pl.model.region_masks.masked_mean` with the given per-level masks."""
    b, n = boxes.shape[:2]
    dims = [f.shape[-1] for f in features]
    out = features[0].new_empty(b, n, sum(dims))
    start = 0
    for level, (f, d) in enumerate(zip(features, dims)):
        out[..., start:start + d] = box_means(f, boxes, image_size) if masks is None else masked_mean(f, masks[level])
        start += d
    return out


class LazyBoxMasks(Sequence):
    """The per-level soft box masks the summed-area path did not need, built on access (so
    :class:`~fineregion_pl.model.encoder.RegionFeatures` ``masks`` keeps its meaning)."""

    def __init__(self, boxes: Tensor, image_size: tuple[int, int], features: Sequence[Tensor]):
        self.boxes, self.image_size = boxes, image_size
        self.grids = [(tuple(f.shape[1:3]), f.dtype) for f in features]

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, level):
        if isinstance(level, slice):
            return [self[i] for i in range(len(self))[level]]
        size, dtype = self.grids[level]
        return box_masks(self.boxes, self.image_size, size).to(dtype)
