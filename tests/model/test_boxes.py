"""Box operations (fineregion_pl/boxes.py) on hand-built cases and random boxes."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from fineregion_pl.model.boxes import box_area, box_geometry, check_box, matched_box_iou, pairwise_intersection, sanitize_boxes
from fineregion_pl.model.errors import BadInputError

NAN, INF = float("nan"), float("inf")


def test_sanitize_boxes_cases():
    boxes = torch.tensor([[
        [10.0, 20.0, 30.0, 40.0],    # 0 fine
        [NAN, 20.0, 30.0, 40.0],     # 1 NaN
        [10.0, 20.0, INF, 40.0],     # 2 inf
        [10.0, -INF, 30.0, 40.0],    # 3 -inf
        [30.0, 40.0, 10.0, 20.0],    # 4 reversed: swapped
        [-5.0, -8.0, 120.0, 70.0],   # 5 over every border: clamped to the image
        [101.0, 10.0, 150.0, 20.0],  # 6 right of the image
        [-30.0, 10.0, -1.0, 20.0],   # 7 left of the image
        [10.0, 20.0, 10.0, 40.0],    # 8 zero width
        [10.0, 20.0, 30.0, 20.0],    # 9 zero height
        [100.0, 10.0, 120.0, 20.0],  # 10 touching the right border from outside: zero width after clamping
        [10.0, 20.0, 30.0, 40.0],    # 11 fine but switched off by region_valid
        [99.5, 59.5, 100.0, 60.0],   # 12 half a pixel in the corner
    ]])
    region_valid = torch.ones(1, 13, dtype=torch.bool)
    region_valid[0, 11] = False
    out, valid = sanitize_boxes(boxes, region_valid, 100, 60)
    expected_valid = [True, False, False, False, True, True, False, False, False, False, False, False, True]
    assert valid[0].tolist() == expected_valid
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0], boxes[0, 0])
    torch.testing.assert_close(out[0, 4], torch.tensor([10.0, 20.0, 30.0, 40.0]))
    torch.testing.assert_close(out[0, 5], torch.tensor([0.0, 0.0, 100.0, 60.0]))
    torch.testing.assert_close(out[0, 12], boxes[0, 12])
    for i, ok in enumerate(expected_valid):
        if not ok:
            assert torch.equal(out[0, i], torch.zeros(4)), i


def test_sanitize_boxes_per_image_sizes():
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 50.0]], [[0.0, 0.0, 50.0, 50.0]], [[45.0, 45.0, 50.0, 50.0]]])
    out, valid = sanitize_boxes(boxes, torch.ones(3, 1, dtype=torch.bool), torch.tensor([40.0, 64.0, 40.0]), torch.tensor([30.0, 64.0, 30.0]))
    torch.testing.assert_close(out[:, 0], torch.tensor([[0.0, 0.0, 40.0, 30.0], [0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 0.0, 0.0]]))
    assert valid[:, 0].tolist() == [True, True, False]


any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(any_float, min_size=4, max_size=4), min_size=1, max_size=8), st.integers(1, 1000), st.integers(1, 1000))
def test_sanitized_boxes_are_finite_ordered_inside_and_valid_means_positive_area(raw, width, height):
    out, valid = sanitize_boxes(torch.tensor([raw]), torch.ones(1, len(raw), dtype=torch.bool), width, height)
    assert torch.isfinite(out).all()
    assert (out[..., 0] >= 0).all() and (out[..., 2] <= width).all() and (out[..., 1] >= 0).all() and (out[..., 3] <= height).all()
    assert (out[..., 2] >= out[..., 0]).all() and (out[..., 3] >= out[..., 1]).all()
    assert (out[..., 2] > out[..., 0])[valid].all() and (out[..., 3] > out[..., 1])[valid].all()
    assert (out[~valid] == 0).all()
    finite = torch.isfinite(torch.tensor([raw])).all(-1)
    assert not (valid & ~finite).any()


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [2.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0, 0.0]


def test_box_iou_hand_cases():
    a = torch.tensor([
        [0.0, 0.0, 2.0, 2.0],  # identical
        [0.0, 0.0, 2.0, 2.0],  # half overlap along x: inter 2, union 6
        [0.0, 0.0, 4.0, 4.0],  # contains: 1/16
        [0.0, 0.0, 1.0, 1.0],  # disjoint
        [0.0, 0.0, 1.0, 1.0],  # touching at an edge
        [0.0, 0.0, 0.0, 0.0],  # both empty
        [0.0, 0.0, 2.0, 2.0],  # one empty
    ])
    b = torch.tensor([
        [0.0, 0.0, 2.0, 2.0],
        [1.0, 0.0, 3.0, 2.0],
        [1.0, 1.0, 2.0, 2.0],
        [2.0, 2.0, 3.0, 3.0],
        [1.0, 0.0, 2.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0],
    ])
    torch.testing.assert_close(matched_box_iou(a, b), torch.tensor([1.0, 1 / 3, 1 / 16, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(matched_box_iou(b, a), matched_box_iou(a, b))
    assert matched_box_iou(a[:0], b[:0]).shape == (0,)


@pytest.mark.parametrize("box, message", [
    ("5599", "is not four numbers"), ([1, 2, 3], "is not four numbers"), ([1, 2, "x", 4], "is not four numbers"),
    ([0, 0, float("nan"), 4], "non-finite"), ([5, 0, 1, 4], "x1 <= x0"), ([0, 5, 4, 1], "y1 <= y0"),
])
def test_check_box_names_the_region_and_the_problem(box, message):
    with pytest.raises(BadInputError, match=f"boxes.json: image 'a.jpg' region 3 .*{message}"):
        check_box(box, "boxes.json: image 'a.jpg' region 3")
    assert check_box([1, 2, 3.5, 4], "x") == [1.0, 2.0, 3.5, 4.0]


def test_pairwise_intersection_hand_case():
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 6.0], [5.0, 0.0, 7.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
                          [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    expected = torch.tensor([
        [[16.0, 4.0, 0.0, 0.0], [4.0, 16.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    ])
    inter = pairwise_intersection(boxes)
    torch.testing.assert_close(inter, expected)
    torch.testing.assert_close(torch.diagonal(inter, dim1=-2, dim2=-1), box_area(boxes))


def test_pairwise_intersection_matches_iou_definition():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 6, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + torch.rand(2, 6, 2, generator=generator) * 30], -1)
    inter = pairwise_intersection(boxes)
    area = box_area(boxes)
    union = area[:, :, None] + area[:, None, :] - inter
    iou = torch.stack([torchvision.ops.box_iou(image, image) for image in boxes])
    torch.testing.assert_close(iou, inter / union)


def test_box_geometry_hand_case():
    boxes = torch.tensor([[[10.0, 20.0, 60.0, 100.0], [0.0, 0.0, 0.0, 0.0]]])
    geometry = box_geometry(boxes, torch.tensor([100.0]), torch.tensor([200.0]))
    torch.testing.assert_close(geometry[0, 0], torch.tensor([0.1, 0.1, 0.6, 0.5, 0.5, 0.4, math.sqrt(0.2)]))
    assert torch.equal(geometry[0, 1], torch.zeros(7))
