"""Region masks and masked pooling (fineregion_pl/regions.py) against plain per-region references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fineregion_pl.model.boxes import sanitize_boxes
from fineregion_pl.model.region_masks import (
    area_downsample,
    axis_coverage,
    box_masks,
    masked_mean,
    merge_masks,
    rasterize_segmentations,
    segmentation_masks,
)

PROPERTY = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- plain per-region references


def reference_mask(box, image_size, feature_size):
    """Each cell's covered fraction by explicit interval arithmetic (float64, one cell at a time)."""
    (height, width), (h, w) = image_size, feature_size
    x0, y0, x1, y1 = (float(v) for v in box)
    cell_h, cell_w = height / h, width / w
    out = np.zeros((h, w))
    if any(math.isnan(v) for v in (x0, y0, x1, y1)):
        return out
    for y in range(h):
        for x in range(w):
            overlap_y = min(y1, (y + 1) * cell_h) - max(y0, y * cell_h)
            overlap_x = min(x1, (x + 1) * cell_w) - max(x0, x * cell_w)
            if overlap_y > 0 and overlap_x > 0:
                out[y, x] = overlap_y * overlap_x / (cell_h * cell_w)
    return out


def reference_pool(features, boxes, image_size):
    """Loop over images and regions: mask each region, average the features under it."""
    feats = features.double().numpy()
    b, h, w, d = feats.shape
    masks = np.zeros((b, boxes.shape[1], h, w))
    pooled = np.zeros((b, boxes.shape[1], d))
    for i in range(b):
        for n in range(boxes.shape[1]):
            m = reference_mask(boxes[i, n].tolist(), image_size, (h, w))
            masks[i, n] = m
            if m.sum() > 0:
                pooled[i, n] = (feats[i] * m[..., None]).sum((0, 1)) / m.sum()
    return masks, pooled


def degenerate_boxes(generator, batch, regions, height, width):
    """Random boxes, a third of them degenerate in one of many ways."""
    u = torch.rand(batch, regions, 4, generator=generator, dtype=torch.float64)
    boxes = torch.stack([u[..., 0] * width, u[..., 1] * height, u[..., 2] * width, u[..., 3] * height], -1)
    kind = torch.randint(0, 9, (batch, regions), generator=generator)
    cell = torch.rand(batch, regions, generator=generator, dtype=torch.float64)
    for b in range(batch):
        for n in range(regions):
            x0, y0, x1, y1 = boxes[b, n].tolist()
            k = int(kind[b, n])
            if k == 0:
                boxes[b, n, 2] = x0  # zero width
            elif k == 1:
                boxes[b, n, 3] = y0  # zero height
            elif k == 2:
                boxes[b, n, int(cell[b, n] * 4)] = float("nan")
            elif k == 3:
                boxes[b, n] = torch.tensor([x0 - width, y0 - height, x1 + width, y1 + height])  # beyond every border
            elif k == 4:
                boxes[b, n] = torch.tensor([width + 3.0, y0, width + 9.0, y1])  # fully outside
            elif k == 5:
                s = float(cell[b, n]) * 0.3
                boxes[b, n] = torch.tensor([x0, y0, x0 + s, y0 + s])  # sub-cell
            elif k == 6:
                boxes[b, n] = torch.tensor([x1, y1, x0, y0])  # reversed
            elif k == 7:
                boxes[b, n] = torch.tensor([math.floor(x0), math.floor(y0), math.ceil(x1) + 1, math.ceil(y1) + 1])  # on pixel edges
    return boxes.float()


SIZES = [((64, 64), (8, 8)), ((384, 384), (24, 24)), ((96, 160), (12, 20)), ((100, 70), (7, 9)), ((37, 53), (37, 53)), ((50, 30), (1, 1))]


@pytest.mark.parametrize("image_size,feature_size", SIZES)
@pytest.mark.parametrize("sanitised", [False, True])
def test_masks_and_pooling_match_per_region_loop(image_size, feature_size, sanitised):
    generator = torch.Generator().manual_seed(hash((image_size, feature_size)) % 2**31)
    boxes = degenerate_boxes(generator, 3, 9, *image_size)
    if sanitised:
        boxes, _ = sanitize_boxes(boxes, torch.ones(boxes.shape[:2], dtype=torch.bool), image_size[1], image_size[0])
    features = torch.randn(3, *feature_size, 5, generator=generator)
    ref_masks, ref_pooled = reference_pool(features, boxes, image_size)

    masks = box_masks(boxes, image_size, feature_size)
    pooled = masked_mean(features, masks)
    assert masks.shape == (3, 9, *feature_size) and pooled.shape == (3, 9, 5)
    assert torch.isfinite(masks).all() and torch.isfinite(pooled).all()
    np.testing.assert_allclose(masks.double().numpy(), ref_masks, atol=1e-5)
    np.testing.assert_allclose(pooled.double().numpy(), ref_pooled, atol=1e-5)


def test_channels_first_view_pools_the_same():
    generator = torch.Generator().manual_seed(0)
    boxes = degenerate_boxes(generator, 2, 6, 64, 48)
    nchw = torch.randn(2, 7, 8, 6, generator=generator)
    masks = box_masks(boxes, (64, 48), (8, 6))
    channels_last = nchw.permute(0, 2, 3, 1)
    torch.testing.assert_close(masked_mean(channels_last, masks), masked_mean(channels_last.contiguous(), masks))


def test_axis_coverage_by_hand():
    cover = axis_coverage(torch.tensor([2.0, 5.0, float("nan"), -math.inf]), torch.tensor([6.0, 4.0, 3.0, math.inf]), 4, 16.0)
    torch.testing.assert_close(cover, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1.0, 1, 1, 1]]))


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    features = torch.randn(2, 4, 4, 3)
    masks = torch.zeros(2, 3, 4, 4)
    masks[1, 2, 1, 1] = 0.25
    pooled = masked_mean(features, masks)
    assert torch.equal(pooled[0], torch.zeros(3, 3)) and torch.equal(pooled[1, :2], torch.zeros(2, 3))
    torch.testing.assert_close(pooled[1, 2], features[1, 1, 1])


# ---------------------------------------------------------------- properties

coordinate = st.one_of(st.floats(-1e4, 1e4, width=32), st.floats(allow_nan=True, allow_infinity=False, width=32))
image_side = st.integers(min_value=1, max_value=512)
cells = st.integers(min_value=1, max_value=40)


@st.composite
def inside_boxes(draw):
    height, width = draw(image_side), draw(image_side)
    count = draw(st.integers(1, 6))
    boxes = []
    for _ in range(count):
        # pixel coordinates to 1/4096 px: sub-pixel boxes, but no sub-normal float areas
        xs = sorted(draw(st.integers(0, width * 4096)) / 4096 for _ in range(2))
        ys = sorted(draw(st.integers(0, height * 4096)) / 4096 for _ in range(2))
        boxes.append([xs[0], ys[0], xs[1], ys[1]])
    return (height, width), torch.tensor([boxes], dtype=torch.float32)


@PROPERTY
@given(st.lists(st.lists(coordinate, min_size=4, max_size=4), min_size=1, max_size=6), image_side, image_side, cells, cells, st.booleans())
def test_masks_in_unit_interval_and_finite_for_any_box(boxes, height, width, h, w, hard):
    masks = box_masks(torch.tensor([boxes], dtype=torch.float32), (height, width), (h, w), hard=hard)
    assert torch.isfinite(masks).all()
    assert masks.min() >= 0 and masks.max() <= 1
    if hard:
        assert set(masks.unique().tolist()) <= {0.0, 1.0}


@PROPERTY
@given(inside_boxes(), cells, cells)
def test_mask_sums_to_box_area_in_cells(sized, h, w):
    (height, width), boxes = sized
    boxes = boxes.double()
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    cell_area = (height / h) * (width / w)
    torch.testing.assert_close(box_masks(boxes, (height, width), (h, w)).sum((-2, -1)), area / cell_area, atol=1e-9, rtol=1e-9)
    single = box_masks(boxes.float(), (height, width), (h, w)).sum((-2, -1))
    torch.testing.assert_close(single.double(), area / cell_area, atol=1e-5, rtol=1e-5)


@PROPERTY
@given(inside_boxes(), cells, cells, st.floats(-100, 100))
def test_pooling_a_constant_map_returns_the_constant(sized, h, w, value):
    (height, width), boxes = sized
    masks = box_masks(boxes, (height, width), (h, w))
    pooled = masked_mean(torch.full((1, h, w, 3), value), masks)
    non_empty = masks.sum((-2, -1)) > 0
    expected = torch.full_like(pooled, value) * non_empty[..., None]
    torch.testing.assert_close(pooled, expected, atol=1e-4 * max(1.0, abs(value)), rtol=1e-5)


@PROPERTY
@given(st.lists(st.lists(coordinate, min_size=4, max_size=4), min_size=1, max_size=6), image_side, image_side, cells, cells)
def test_hard_masks_binary_and_never_empty_for_valid_boxes(boxes, height, width, h, w):
    boxes, valid = sanitize_boxes(torch.tensor([boxes], dtype=torch.float32), torch.ones(1, len(boxes), dtype=torch.bool), width, height)
    masks = box_masks(boxes, (height, width), (h, w), hard=True)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    sums = masks.sum((-2, -1))
    assert (sums[valid] >= 1).all()
    assert (sums[~valid] == 0).all()


def test_hard_mask_by_hand():
    boxes = torch.tensor([[[0.0, 0.0, 12.0, 12.0], [17.0, 17.0, 18.0, 18.0]]])
    masks = box_masks(boxes, (32, 32), (4, 4), hard=True)
    expected_big = torch.zeros(4, 4)
    expected_big[:2, :2] = 1  # cell 1 is covered 4/8 = half along each axis
    torch.testing.assert_close(masks[0, 0], expected_big)
    assert masks[0, 1].sum() == 1 and masks[0, 1, 2, 2] == 1  # sub-cell box keeps its centre cell


# ---------------------------------------------------------------- gradients


def test_gradient_to_features_is_the_normalised_mask():
    generator = torch.Generator().manual_seed(1)
    boxes = degenerate_boxes(generator, 2, 5, 48, 64)
    masks = box_masks(boxes, (48, 64), (6, 8))
    features = torch.randn(2, 6, 8, 4, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 5, 4, generator=generator)
    (masked_mean(features, masks) * upstream).sum().backward()
    weights = masks / masks.sum((-2, -1), keepdim=True).clamp(min=1e-6)
    expected = torch.einsum("bnyx,bnd->byxd", weights, upstream)
    torch.testing.assert_close(features.grad, expected, atol=1e-6, rtol=1e-5)

    features.grad = None
    masked_mean(features, masks)[1, 2, 3].backward()  # one region, one channel
    torch.testing.assert_close(features.grad[1, ..., 3], weights[1, 2], atol=1e-7, rtol=1e-6)
    assert features.grad[..., :3].abs().sum() == 0 and features.grad[0].abs().sum() == 0


def test_gradient_to_masks_when_they_require_grad():
    features = torch.randn(1, 3, 3, 2, dtype=torch.float64)
    masks = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: masked_mean(features, m), (masks,))


# ---------------------------------------------------------------- segmentation masks


def square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_square_polygon_with_pixel_corners_gives_its_box_mask():
    image_size, feature_size = (96, 80), (12, 10)
    boxes = [[8, 4, 40, 36], [3, 5, 77, 90], [0, 0, 80, 96], [21, 13, 22, 14]]
    masks = segmentation_masks([[square_polygon(*b) for b in boxes]], image_size, feature_size)
    expected = box_masks(torch.tensor([boxes], dtype=torch.float32), image_size, feature_size)
    torch.testing.assert_close(masks, expected, atol=1e-6, rtol=0)


def test_square_polygon_with_fractional_corners_within_a_pixel_of_its_box():
    image_size, feature_size = (64, 64), (8, 8)
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(10, 2, generator=generator) * 40 + 2
    sizes = torch.rand(10, 2, generator=generator) * 20 + 1
    boxes = torch.cat([corners, corners + sizes], -1)
    masks = segmentation_masks([[square_polygon(*b.tolist()) for b in boxes]], image_size, feature_size)
    expected = box_masks(boxes[None], image_size, feature_size)
    # rasterisation moves each edge by at most one pixel: one pixel row/column of a cell.
    pixel_share = 1 / 8 + 1 / 8
    assert (masks - expected).abs().max() <= pixel_share
    area_in_pixels = (sizes[:, 0] * sizes[:, 1])[None]
    perimeter = 2 * (sizes[:, 0] + sizes[:, 1])[None]
    assert ((masks.sum((-2, -1)) * 64 - area_in_pixels).abs() <= perimeter + 4).all()


def test_rle_forms_agree_with_polygon_and_missing_segmentation_is_zero():
    from pycocotools import mask as mask_utils

    height, width = 40, 30
    polygon = [[5.5, 3.0, 25.0, 8.0, 12.0, 35.0]]
    binary = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, height, width)))
    compressed = mask_utils.encode(np.asfortranarray(binary))
    as_text = {"size": compressed["size"], "counts": compressed["counts"].decode()}
    counts, value, run = [], 0, 0  # uncompressed COCO RLE: alternating run lengths, zeros first, column-major
    for pixel in binary.flatten(order="F").tolist():
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    uncompressed = {"size": [height, width], "counts": counts}

    full = rasterize_segmentations([[polygon, compressed, None], [as_text, uncompressed]], (height, width))
    assert full.shape == (2, 3, height, width) and full.dtype == torch.uint8
    for b, n in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        assert torch.equal(full[b, n], torch.from_numpy(binary)), (b, n)
    assert full[0, 2].sum() == 0 and full[1, 2].sum() == 0  # no segmentation, padding

    masks = segmentation_masks([[polygon, compressed, None], [as_text, uncompressed]], (height, width), (4, 3), num_regions=4)
    assert masks.shape == (2, 4, 4, 3)
    torch.testing.assert_close(masks[0, 0], F.avg_pool2d(torch.from_numpy(binary).float()[None], 10)[0])
    assert masks[0, 2:].sum() == 0 and masks[1, 2:].sum() == 0


def test_multi_part_polygon_is_the_union():
    parts = square_polygon(0, 0, 8, 8) + square_polygon(16, 16, 24, 32)
    masks = segmentation_masks([[parts]], (32, 32), (4, 4))
    expected = box_masks(torch.tensor([[[0.0, 0.0, 8.0, 8.0], [16.0, 16.0, 24.0, 32.0]]]), (32, 32), (4, 4)).sum(1, keepdim=True)
    torch.testing.assert_close(masks, expected)


def test_segmentation_errors_say_where_and_what():
    with pytest.raises(ValueError, match=r"image 0 region 1: RLE size \[10, 10\] differs"):
        rasterize_segmentations([[None, {"size": [10, 10], "counts": [100]}]], (20, 10))
    with pytest.raises(ValueError, match="image 1 region 0: a polygon needs"):
        rasterize_segmentations([[], [[[1.0, 2.0, 3.0, 4.0]]]], (20, 10))
    with pytest.raises(ValueError, match="image 0 has 2 segmentations but num_regions=1"):
        rasterize_segmentations([[None, None]], (20, 10), num_regions=1)


@pytest.mark.parametrize("full,cells", [((48, 64), (12, 16)), ((50, 70), (12, 16)), ((37, 41), (5, 7)), ((30, 30), (30, 30)), ((9, 9), (1, 1))])
def test_area_downsampling_keeps_total_area(full, cells):
    generator = torch.Generator().manual_seed(4)
    masks = (torch.rand(2, 3, *full, generator=generator) > 0.7).to(torch.uint8)
    small = area_downsample(masks, cells, dtype=torch.float64)
    assert small.shape == (2, 3, *cells) and small.min() >= 0 and small.max() <= 1 + 1e-12
    cell_area = (full[0] / cells[0]) * (full[1] / cells[1])
    torch.testing.assert_close(small.sum((-2, -1)) * cell_area, masks.double().sum((-2, -1)))
    if full[0] % cells[0] == 0 and full[1] % cells[1] == 0:
        torch.testing.assert_close(small, F.adaptive_avg_pool2d(masks.double(), cells))


def test_area_downsample_matches_interval_reference_when_not_divisible():
    masks = torch.zeros(1, 1, 10, 7)
    masks[0, 0, 2:9, 1:4] = 1  # the box x in [1, 4], y in [2, 9]
    torch.testing.assert_close(area_downsample(masks, (4, 3)).double()[0, 0], torch.from_numpy(reference_mask([1, 2, 4, 9], (10, 7), (4, 3))))


def test_merge_masks_prefers_segmentation():
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 32.0]]])
    box = box_masks(boxes, (32, 32), (4, 4))
    seg = segmentation_masks([[square_polygon(0, 0, 8, 8), None]], (32, 32), (4, 4))
    merged = merge_masks(seg, box)
    torch.testing.assert_close(merged[0, 0], seg[0, 0])
    torch.testing.assert_close(merged[0, 1], box[0, 1])


# ---------------------------------------------------------------- no Python loop over images or regions


class CountAtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def forward_ops(batch, regions, hard):
    generator = torch.Generator().manual_seed(batch * 100 + regions)
    boxes = degenerate_boxes(generator, batch, regions, 96, 128)
    features = [torch.randn(batch, 12, 16, 8), torch.randn(batch, 6, 8, 16)]
    seg = torch.zeros(batch, regions, 96, 128)
    with CountAtenOps() as counter:
        for level in features:
            masks = box_masks(boxes, (96, 128), level.shape[1:3], hard=hard)
            masks = merge_masks(area_downsample(seg, level.shape[1:3]), masks)
            masked_mean(level, masks)
    return counter.ops


@pytest.mark.parametrize("hard", [False, True])
def test_aten_op_sequence_does_not_depend_on_batch_or_region_count(hard):
    reference = forward_ops(1, 1, hard)
    assert len(reference) > 0
    for batch, regions in [(1, 64), (8, 1), (8, 64)]:
        assert forward_ops(batch, regions, hard) == reference
