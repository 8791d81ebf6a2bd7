"""Box pooling by prefix sums: the soft-coverage masked mean of a box without its mask or a dense matmul.

For an axis-aligned box, the soft mask of :func:`~fineregion_pl.model.region_masks.box_masks` is
separable, ``M(y, x) = a(y) b(x)`` with ``a`` and ``b`` the fraction of each cell row and column
the box covers, so ``sum(M * F) = sum_x b(x) sum_y a(y) F[y, x]``. The integral of the
piecewise-constant feature map along ``y`` from 0 to ``u`` is the linear interpolation of the row
prefix sums ``C[r] = sum_{y < r} F[y]`` at ``u``, so the ``y`` sum is exactly a combination of the
prefix rows at the (at most four) row boundaries around the box's ends, and

    z = sum_k w_k (b . C[r_k]) / area

(``b . C[r]`` contracts the ``w`` columns of one prefix row with the box's column coverage). The
prefix rows are never stored: one running sum ``R`` of shape ``(B, w, d)`` is streamed down the
rows (one in-place add per row, which reads the features once), and at each row boundary the
regions that need it are served by one small ``bmm`` of their column coverages with ``R``. The
work is one pass over the features plus ``4 N w d`` multiply-adds per image and level (the dense
matmul: ``N h w d``).

Numerics: ``R`` is float32 (float64 for float64 features); the features are centred per image and
channel (by their first row's mean, subtracted from ``R`` every :data:`CENTRE_EVERY` rows and added
back exactly through the lookup weights), so the prefix sums stay within ``CENTRE_EVERY`` times
the features' spread and offset, and a box's mean keeps an error of a few float32 ulps of that
(measured: the same order as the dense float32 matmul's own error against float64, up to ~7x it
for features with a large common offset, e.g. 3e-4 vs 1.3e-4 at mean 300 over 96 rows). Two lookups of one region at
the same boundary are merged (in float64) before use, so a box inside one cell row is
``(f1 - f0) * (C[c + 1] - C[c])``, not a cancellation of large terms.

Why not a 2-D integral image with ``torch.cumsum``: torch's CPU ``cumsum`` is a scalar loop per
output line (accumulating in double), ~10x a vectorised add per element on this machine and worse
along a non-last dimension; a fresh ``(B, h+1, w+1, d)`` table costs page faults on every call
(a fresh-buffer copy measured 3.4x a copy into an existing one), float64 doubles its bytes, and
the second (column) pass reads and writes the whole table again.

Shapes as in :mod:`fineregion_pl.model.region_masks`: ``features (B, h, w, d)`` channels-last,
``boxes (B, N, 4)`` xyxy pixels of the model input, pooled ``(B, N, d)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fineregion_pl.model.region_masks import axis_coverage, box_masks, masked_mean

INTEGRAL_MIN_ROWS = 48
"""Feature rows a level needs before the model pools it by prefix sums (when exact)."""

INTEGRAL_MIN_ROW_VALUES = 1 << 16
"""Values per feature row of the whole batch (``B w d``) a level needs before the model pools it by
prefix sums: below that, the fixed cost of the torch ops of each row dominates (the table below
was measured at ``B w d = 147,456``)."""

INTEGRAL_MIN_REGION_ROWS = 8192
"""Region slots per image times feature rows from which the model pools a level by prefix sums.

The dense matmul costs ``2 N`` multiply-adds per feature element at matmul speed; the streamed
prefix sums cost one memory-bound pass over the features (an in-place add per row), Python and
kernel-launch work per row, and lookups of ``4 N / h`` multiply-adds per element in small
``bmm``s. Measured by ``python benchmarks/run.py`` on the project's 2-core Xeon (AVX-512, 2
threads, quiet machine, 2026-12-07; B=8; prefix-sum time / dense time, median of 5 interleaved rounds):

    level         N=32   N=64   N=128  N=256
    96x96x192     1.25   0.97   0.73   0.46
    48x48x384     1.61   1.47   1.03   0.76
    24x24x768     2.11   1.90   1.64   1.30
    12x12x1536    2.59   2.80   2.64   2.79

so a level is pooled by prefix sums when ``h >= INTEGRAL_MIN_ROWS``, ``N h >=
INTEGRAL_MIN_REGION_ROWS`` and ``B w d >= INTEGRAL_MIN_ROW_VALUES`` (at N=32, Osprey's setting, no
level qualifies: the dense matmul; 8192 declines the two cells near 1.0 that 6144, the one-thread
measurement under load, picked). ``benchmarks/bench_pooling.py`` re-measures this table.
"""

CENTRE_EVERY = 8
"""Rows between two subtractions of the centring offset from the running row sum."""

LOOKUP_BUFFER = 1 << 16
"""Least number of values the lookups of consecutive row boundaries collect in before they are
scattered into the output (the buffer is also at least ``B (N + 1) d / 4`` and one boundary's)."""

_EARLIER = torch.ones(4, 4, dtype=torch.bool).tril(-1)


@dataclass
class RowPlan:
    """Which regions read the running row sum at each row boundary, and with what weights.

    Entries are grouped by boundary ``r`` (1..h), each group laid out ``(B, k_r)`` (padded with
    zero weights pointing at a dummy output row), so boundary ``r``'s lookups are one
    ``bmm(weights[o_r:o_{r+1}].view(B, k_r, w), R)``.

    Attributes:
        weights: ``(E, w)`` y-weight x column coverage / area of every entry.
        target: ``(E,)`` flat output row ``b * (N + 1) + n`` of every entry (``N``: the dummy).
        slots: ``k_r`` per boundary ``r = 0..h`` (``k_0 = 0``).
        offsets: start of each boundary's entries, ``h + 2`` values.
        shift: ``(B, N)`` multiple of the centring offset the lookups subtracted (added back).
    """

    weights: Tensor
    target: Tensor
    slots: list[int]
    offsets: list[int]
    shift: Tensor


def row_plan(boxes: Tensor, image_size: tuple[int, int], h: int, w: int, dtype: torch.dtype) -> RowPlan:
    """The lookups of every box on an ``h x w`` grid (see :class:`RowPlan`); float64 inside."""
    height, width = image_size
    b, n = boxes.shape[:2]
    ends = (boxes[..., 1::2].double() * (h / float(height))).clamp(0, h)  # (B, N, 2) rows of y0, y1
    len_y = torch.nan_to_num(ends[..., 1] - ends[..., 0], nan=0.0).clamp(min=0)
    ends = torch.nan_to_num(ends, nan=0.0)
    cell = ends.floor().clamp(max=h - 1)
    frac = ends - cell
    index = torch.stack([cell, cell + 1], -1).long().flatten(-2)  # (B, N, 4): c0, c0 + 1, c1, c1 + 1
    weight = torch.stack([frac[..., 0] - 1, -frac[..., 0], 1 - frac[..., 1], frac[..., 1]], -1)
    merged = torch.zeros(b, n, h + 1, dtype=torch.float64, device=boxes.device).scatter_add_(-1, index, weight)
    repeated = ((index[..., :, None] == index[..., None, :]) & _EARLIER.to(boxes.device)).any(-1)
    weight = merged.gather(-1, index).masked_fill_(repeated, 0.0)
    cover_x = axis_coverage(boxes[..., 0].double(), boxes[..., 2].double(), w, float(width))  # (B, N, w)
    len_x = cover_x.sum(-1)
    area = len_y * len_x
    tiny = torch.finfo(dtype).tiny
    weight = weight * ((area >= tiny) / area.clamp(min=tiny))[..., None]
    shift = (weight * torch.div(index, CENTRE_EVERY, rounding_mode="floor") * CENTRE_EVERY).sum(-1) * len_x
    # group the entries by boundary; boundary 0 (an empty prefix) and zero weights go to row h + 1
    row = torch.where((weight != 0) & (index > 0), index, h + 1).view(b, 4 * n)
    row, order = torch.sort(row, dim=-1, stable=True)
    slot = torch.arange(4 * n, device=boxes.device).expand(b, -1) - torch.searchsorted(row, row)
    counts = torch.zeros(b, h + 2, dtype=torch.long, device=boxes.device).scatter_add_(-1, row, torch.ones_like(row))
    slots = counts[:, : h + 1].amax(0)
    offsets = torch.zeros(h + 2, dtype=torch.long, device=boxes.device)
    offsets[1:] = torch.cumsum(slots * b, 0)
    keep = row <= h
    image = torch.arange(b, device=boxes.device)[:, None].expand(b, 4 * n)
    region = torch.div(order, 4, rounding_mode="floor")
    kept_row = row[keep]
    position = offsets[kept_row] + image[keep] * slots[kept_row] + slot[keep]
    total = int(offsets[-1])
    weights = torch.zeros(total, w, dtype=dtype, device=boxes.device)
    weights[position] = (weight.view(b, 4 * n).gather(-1, order)[keep, None] * cover_x[image[keep], region[keep]]).to(dtype)
    target = torch.full((total,), n, dtype=torch.long, device=boxes.device)  # padding: image 0's dummy row
    target[position] = (image * (n + 1) + region)[keep]
    return RowPlan(weights, target, slots.tolist(), offsets.tolist(), shift)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(features: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """The forward of :func:`box_means` (no autograd): ``(B, N, d)`` in the accumulation dtype."""
    b, h, w, d = features.shape
    n = boxes.shape[1]
    acc = _accumulator(features.dtype)
    plan = row_plan(boxes, image_size, h, w, acc)
    offset = features[:, 0].mean(1, dtype=acc, keepdim=True)  # (B, 1, d): the centring offset
    step = offset * CENTRE_EVERY
    running = torch.zeros(b, w, d, dtype=acc, device=features.device)
    out = torch.zeros(b * (n + 1), d, dtype=acc, device=features.device)
    # the lookups of consecutive boundaries collect in a buffer of ~max(B (N + 1) d / 4, LOOKUP_BUFFER)
    # values, scattered into ``out`` whenever the next boundary's would not fit (bounded memory)
    largest = max(k * b for k in plan.slots)
    parts = torch.empty(max(largest, max(out.numel() // 4, LOOKUP_BUFFER) // max(d, 1)), d, dtype=acc, device=features.device)
    first = fill = 0  # entry index of parts[0], rows of parts in use
    rows = features.unbind(1)
    for r in range(1, h + 1):
        running.add_(rows[r - 1])
        if r % CENTRE_EVERY == 0:
            running.sub_(step)
        k = plan.slots[r]
        if k:
            lo, hi = plan.offsets[r], plan.offsets[r + 1]
            if fill + hi - lo > parts.shape[0]:
                out.index_add_(0, plan.target[first:first + fill], parts[:fill])
                first, fill = lo, 0
            torch.bmm(plan.weights[lo:hi].view(b, k, w), running, out=parts[fill:fill + hi - lo].view(b, k, d))
            fill += hi - lo
    if fill:
        out.index_add_(0, plan.target[first:first + fill], parts[:fill])
    return out.view(b, n + 1, d)[:, :n] + plan.shift[..., None].to(acc) * offset


class _BoxMeans(torch.autograd.Function):
    """:func:`_stream` with the dense path's gradient: ``dz_i / dF[y, x] = M_i[y, x] / sum(M_i)``."""

    @staticmethod
    def forward(ctx, features: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(boxes)
        ctx.image_size, ctx.shape, ctx.dtype = image_size, features.shape, features.dtype
        return _stream(features, boxes, image_size).to(features.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (boxes,) = ctx.saved_tensors
        b, h, w, d = ctx.shape
        masks = box_masks(boxes, ctx.image_size, (h, w)).to(grad.dtype).reshape(b, boxes.shape[1], h * w)
        total = masks.sum(-1, keepdim=True)
        tiny = torch.finfo(masks.dtype).tiny
        scaled = grad * ((total >= tiny).to(grad.dtype) / total.clamp(min=tiny))
        return torch.bmm(masks.transpose(1, 2), scaled).view(b, h, w, d).to(ctx.dtype), None, None


def box_means(features: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Soft-coverage masked mean of every box on one level, from streamed row prefix sums.

    Equal (to float32 rounding) to ``masked_mean(features, box_masks(boxes, image_size, (h, w)))``,
    the empty-mask rule included: reversed, zero-area, NaN and out-of-image boxes pool to zeros.
    Differentiable in ``features`` (the dense path's gradient).

    Args:
        features: ``(B, h, w, d)`` channels-last feature map (any strides).
        boxes: ``(B, N, 4)`` xyxy pixels.
        image_size: ``(H, W)`` of the model input.

    Returns:
        ``(B, N, d)`` in the dtype of ``features``.
    """
    if boxes.shape[1] == 0 or features.shape[-1] == 0:
        return features.new_zeros(features.shape[0], boxes.shape[1], features.shape[-1])
    if torch.is_grad_enabled() and features.requires_grad:
        return _BoxMeans.apply(features, boxes, tuple(image_size))
    return _stream(features, boxes, image_size).to(features.dtype)


def integrals_exact(pooling: str, hard: bool, mask_transform: object, segmentations: Optional[Tensor]) -> bool:
    """Whether :func:`box_means` gives exactly what the dense path would: soft box masks, mask
    pooling, no mask perturbation (dynamic masking's dilation/erosion/mixing) and no segmentation."""
    return pooling == "mask" and not hard and mask_transform is None and segmentations is None


def integrals_faster(level: Tensor, regions: int) -> bool:
    """Whether prefix sums pool ``regions`` slots per image from this ``(B, h, w, d)`` level faster
    than the dense matmul (:data:`INTEGRAL_MIN_ROWS`, :data:`INTEGRAL_MIN_REGION_ROWS`,
    :data:`INTEGRAL_MIN_ROW_VALUES`)."""
    b, rows, w, d = level.shape
    return rows >= INTEGRAL_MIN_ROWS and regions * rows >= INTEGRAL_MIN_REGION_ROWS and b * w * d >= INTEGRAL_MIN_ROW_VALUES


def use_integrals(features: Sequence[Tensor], boxes: Tensor, exact: bool) -> bool:
    """The model's rule: prefix sums when they are exact (:func:`integrals_exact`) and faster on
    at least one level (:func:`integrals_faster`; :func:`pool_boxes` then picks per level); the
    dense matmul otherwise."""
    n = boxes.shape[1]
    return exact and all(f.is_floating_point() for f in features) and any(integrals_faster(f, n) for f in features)


def pool_boxes(features: Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Soft box masks pooled from every level, each level the faster exact way: prefix sums where
    :func:`integrals_faster`, the dense masked matmul elsewhere. ``(B, N, sum d)``."""
    n = boxes.shape[1]
    masks = [None if integrals_faster(f, n) else box_masks(boxes, image_size, f.shape[1:3]).to(f.dtype) for f in features]
    return pool_levels(features, boxes, image_size, masks)


def pool_levels(features: Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int],
                masks: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
    """Every level pooled into one preallocated ``(B, N, sum d)`` output (no per-level outputs
    alive together, no ``torch.cat``): :func:`box_means` when ``masks`` (or its entry for the
    level) is ``None``, else :func:`~fineregion_pl.model.region_masks.masked_mean` with that mask."""
    b, n = boxes.shape[:2]
    dims = [f.shape[-1] for f in features]
    out = features[0].new_empty(b, n, sum(dims))
    start = 0
    for level, (f, d) in enumerate(zip(features, dims)):
        mask = None if masks is None else masks[level]
        out[..., start:start + d] = box_means(f, boxes, image_size) if mask is None else masked_mean(f, mask)
        start += d
    return out


class LazyBoxMasks(Sequence):
    """The per-level soft box masks the prefix-sum path did not need, built on access (so
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
