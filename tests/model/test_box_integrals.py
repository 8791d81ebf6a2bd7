"""Prefix-sum box pooling equals the dense soft-mask pooling: values, gradients, the model's dispatch."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONE_KWARGS

from fineregion_pl.model import box_integrals
from fineregion_pl.model.box_integrals import box_means, pool_levels, row_plan
from fineregion_pl.model.encoder import RegionEncoder
from fineregion_pl.model.region_masks import box_masks, masked_mean

SIZE = (96, 128)  # (H, W): cells of 6 x 8, 12 x 16 ... pixels, non-square on purpose
LEVELS = [(16, 16, 8), (8, 8, 16), (3, 5, 4)]  # (h, w, d); 96/3 and 128/5 are fractional cell sizes


def odd_boxes() -> torch.Tensor:
    """Fractional, cell-aligned, whole-image, zero-area, reversed, outside, NaN, infinite and tiny boxes."""
    rows = [
        [3.3, 5.7, 50.1, 41.9], [0.0, 0.0, 128.0, 96.0], [-20.0, -5.0, 200.0, 300.0], [8.0, 6.0, 16.0, 12.0],
        [10.0, 10.0, 10.0, 40.0], [30.0, 20.0, 10.0, 50.0], [130.0, 0.0, 150.0, 20.0], [float("nan"), 1.0, 5.0, 5.0],
        [100.0, 60.0, float("inf"), float("inf")], [64.0, 48.0, 64.001, 48.002], [127.5, 95.5, 128.0, 96.0], [-float("inf"), 0.0, 3.0, 2.0],
    ]
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(12, 2, generator=generator) * torch.tensor([128.0, 96.0])
    random = torch.cat([corner, corner + torch.rand(12, 2, generator=generator) * 60], -1)
    return torch.stack([torch.tensor(rows), random])  # (2, 12, 4)


def level_features(seed: int = 1, offset: float = 0.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, w, d, generator=generator) + offset for h, w, d in LEVELS]


def dense(features, boxes):
    return torch.cat([masked_mean(f, box_masks(boxes, SIZE, f.shape[1:3]).to(f.dtype)) for f in features], -1)


def test_row_plan_merges_the_lookups_of_one_boundary():
    h, w = 16, 16
    boxes = torch.tensor([[[8.0, 6.0, 16.0, 7.5], [8.0, 6.2, 16.0, 11.9]]])  # inside one cell row; across one boundary
    plan = row_plan(boxes, SIZE, h, w, torch.float64)
    assert plan.slots[0] == 0 and len(plan.offsets) == h + 2
    # every (region, boundary) pair appears once: the merged weights, not a cancellation of two terms
    pairs = [(int(t), r) for r in range(1, h + 1) for t in plan.target[plan.offsets[r]:plan.offsets[r + 1]].tolist() if t < 2]
    assert len(pairs) == len(set(pairs))
    assert {r for t, r in pairs if t == 0} == {1, 2}  # y in [1, 1.25] cells: boundaries 1 and 2 only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_means_equal_dense_pooling_on_many_random_boxes(dtype):
    generator = torch.Generator().manual_seed(5)
    corner = torch.rand(3, 200, 2, generator=generator) * torch.tensor([140.0, 110.0]) - 6
    boxes = torch.cat([corner, corner + torch.rand(3, 200, 2, generator=generator) * 40], -1)
    for h, w, d in [(40, 37, 6), (96, 20, 3), (3, 5, 4), (1, 1, 3)]:
        f = torch.randn(3, h, w, d, generator=generator).to(dtype)
        ours, reference = box_means(f, boxes, SIZE), masked_mean(f, box_masks(boxes.to(dtype), SIZE, (h, w)))
        assert ours.dtype == dtype
        assert (ours - reference).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-12)
        # spread and offset: within a few float32 ulps of the largest feature of the exact mean
        shifted = f * 3 + 5
        truth = masked_mean(shifted.double(), box_masks(boxes.double(), SIZE, (h, w)))
        assert (box_means(shifted, boxes, SIZE) - truth).abs().max() <= 1e-5 * float(shifted.abs().max())


def test_a_small_lookup_buffer_is_scattered_often_with_the_same_result(monkeypatch):
    features, boxes = level_features(), odd_boxes()
    reference = pool_levels(features, boxes, SIZE)
    monkeypatch.setattr(box_integrals, "LOOKUP_BUFFER", 1)  # the buffer: one boundary's lookups
    torch.testing.assert_close(pool_levels(features, boxes, SIZE), reference, atol=1e-6, rtol=0)


def test_box_means_of_a_channels_first_view_and_of_no_regions():
    f = level_features()[0]
    view = f.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # not contiguous channels-last
    torch.testing.assert_close(box_means(view, odd_boxes(), SIZE), box_means(f, odd_boxes(), SIZE))
    assert box_means(f, torch.zeros(2, 0, 4), SIZE).shape == (2, 0, f.shape[-1])


@pytest.mark.parametrize("offset", [0.0, 300.0])  # large means: the cancellation float64 is there for
def test_box_means_equal_dense_pooling_on_every_kind_of_box(offset):
    boxes = odd_boxes()
    features = level_features(offset=offset)
    ours, reference = pool_levels(features, boxes, SIZE), dense(features, boxes)
    assert ours.shape == (2, 12, sum(d for *_, d in LEVELS))
    assert torch.isfinite(ours).all()
    assert (ours - reference).abs().max() <= 1e-5 * max(1.0, offset)
    for n in (4, 5, 6, 7):  # zero-area, reversed, outside, NaN: the dense path's empty-mask zeros
        assert torch.equal(ours[0, n], torch.zeros_like(ours[0, n]))
    whole = torch.cat([f[0].mean((0, 1)) for f in features])
    torch.testing.assert_close(ours[0, 1], whole, atol=1e-5 * max(1.0, offset), rtol=0)


def test_box_means_gradient_equals_the_normalised_mask():
    boxes = odd_boxes()
    f = level_features()[1].requires_grad_(True)
    g = torch.randn(2, 12, f.shape[-1], generator=torch.Generator().manual_seed(3))
    (box_means(f, boxes, SIZE) * g).sum().backward()
    ours = f.grad.clone()
    f.grad = None
    (masked_mean(f, box_masks(boxes, SIZE, f.shape[1:3])) * g).sum().backward()
    torch.testing.assert_close(ours, f.grad, atol=1e-5, rtol=1e-5)


def test_bfloat16_features_stay_bfloat16():
    f = level_features()[0].bfloat16()
    out = box_means(f, odd_boxes(), SIZE)
    assert out.dtype == torch.bfloat16
    assert (out.float() - dense([f.float()], odd_boxes())).abs().max() < 0.05


def tiny_encoder() -> RegionEncoder:
    return RegionEncoder(backbone="swin_tiny_patch4_window7_224", feature_levels=[1, 2], backbone_kwargs=dict(TINY_BACKBONE_KWARGS))


def test_the_encoder_picks_summed_area_tables_only_when_exact(monkeypatch):
    """Where the compiled CPU loop does not run (a GPU, no compiler): prefix sums or the dense path."""
    monkeypatch.setattr("fineregion_pl.model.encoder.box_pool", lambda *args: None)
    encoder = tiny_encoder()
    features = level_features()[:2]
    boxes = odd_boxes()
    dense_z, dense_masks = encoder.pool(features, boxes, SIZE)
    assert isinstance(dense_masks, list)  # 12 regions x 16 rows < INTEGRAL_MIN_REGION_ROWS: the dense path
    monkeypatch.setattr(box_integrals, "INTEGRAL_MIN_ROWS", 1)
    monkeypatch.setattr(box_integrals, "INTEGRAL_MIN_REGION_ROWS", 1)
    monkeypatch.setattr(box_integrals, "INTEGRAL_MIN_ROW_VALUES", 1)
    z, masks = encoder.pool(features, boxes, SIZE)
    assert isinstance(masks, box_integrals.LazyBoxMasks)
    assert (z - dense_z).abs().max() <= 1e-5
    assert all(torch.equal(m, d) for m, d in zip(masks, dense_masks))
    for kwargs in [dict(hard=True), dict(mask_transform=lambda m: m * 0.5), dict(segmentations=torch.zeros(2, 12, *SIZE))]:
        _, other = encoder.pool(features, boxes, SIZE, **kwargs)
        assert isinstance(other, list), kwargs
    assert box_integrals.use_integrals(features, boxes, exact=True)
    assert not box_integrals.use_integrals(features, boxes, exact=False)


def test_the_rule_picks_prefix_sums_per_level(monkeypatch):
    features = level_features()  # 16, 8 and 3 rows
    boxes = odd_boxes()  # 12 regions
    monkeypatch.setattr(box_integrals, "INTEGRAL_MIN_ROWS", 8)
    monkeypatch.setattr(box_integrals, "INTEGRAL_MIN_REGION_ROWS", 12 * 16)
    monkeypatch.setattr(box_integrals, "INTEGRAL_MIN_ROW_VALUES", 2 * 16 * 8)
    assert [box_integrals.integrals_faster(f, 12) for f in features] == [True, False, False]
    assert box_integrals.use_integrals(features, boxes, exact=True)
    assert not box_integrals.use_integrals(features[1:], boxes, exact=True)
    mixed = box_integrals.pool_boxes(features, boxes, SIZE)
    assert (mixed - dense(features, boxes)).abs().max() <= 1e-5
    # Osprey's setting (B=8, N=32; 96, 48, 24, 12 rows) stays on the dense matmul with the shipped rule
    monkeypatch.undo()
    osprey = [torch.empty(8, s, s, 18432 // s) for s in (96, 48, 24, 12)]
    assert not box_integrals.use_integrals(osprey, torch.zeros(8, 32, 4), exact=True)
    assert not box_integrals.use_integrals(osprey, torch.zeros(8, 64, 4), exact=True)  # 96 rows x 64 < INTEGRAL_MIN_REGION_ROWS
    assert box_integrals.use_integrals(osprey, torch.zeros(8, 128, 4), exact=True)
    assert not box_integrals.use_integrals([f[:1] for f in osprey], torch.zeros(1, 128, 4), exact=True)  # one image: B w d too small
