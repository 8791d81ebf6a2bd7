"""The compiled box-pooling loop gives the dense masked matmul's numbers and gradients."""

from __future__ import annotations

import pytest
import torch

from fineregion_pl.model import box_pool_kernel
from fineregion_pl.model.box_pool_kernel import box_pool
from fineregion_pl.model.encoder import EncoderConfig
from fineregion_pl.model.region_masks import box_masks, masked_mean

SIZE = (96, 128)  # (H, W): not square, so x and y cannot be swapped unnoticed

pytestmark = pytest.mark.skipif(not box_pool_kernel.available(), reason="the kernel does not build here (no compiler); the model keeps the dense path")


def awkward_boxes() -> torch.Tensor:
    """Fractional, inside-one-cell, zero-area, reversed, NaN, out-of-image and whole-image boxes, and random ones."""
    generator = torch.Generator().manual_seed(0)
    centre = torch.rand(3, 9, 2, generator=generator) * torch.tensor([128.0, 96.0])
    side = torch.rand(3, 9, 2, generator=generator) * 40 + 0.5
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=-1)
    boxes[0, 0] = torch.tensor([10.3, 20.7, 11.1, 21.2])  # inside one cell of every level
    boxes[0, 1] = torch.tensor([5.0, 5.0, 5.0, 40.0])  # zero width
    boxes[0, 2] = torch.tensor([50.0, 30.0, 20.0, 60.0])  # reversed
    boxes[1, 0] = torch.tensor([float("nan"), 3.0, 20.0, 30.0])
    boxes[1, 1] = torch.tensor([140.0, 100.0, 200.0, 130.0])  # outside the image
    boxes[1, 2] = torch.tensor([0.0, 0.0, 128.0, 96.0])  # the whole image
    boxes[2, 0] = torch.tensor([-20.0, -5.0, 300.0, 40.5])  # past two borders
    return boxes


def levels(dtype=torch.float32, requires_grad=False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # 70 channels: one register block of 64 and a remainder; 3 channels: the remainder only
    return [torch.randn(3, h, w, d, generator=generator, dtype=dtype).requires_grad_(requires_grad) for h, w, d in [(12, 16, 70), (6, 8, 3), (3, 4, 128)]]


def dense(features: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([masked_mean(f, box_masks(boxes, SIZE, f.shape[1:3]).to(f.dtype)) for f in features], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_the_dense_path_with_its_gradient(dtype):
    boxes = awkward_boxes()
    ours_in, reference_in = levels(dtype, True), levels(dtype, True)
    strided = torch.zeros(3, 9, 8)
    strided[..., :4] = boxes
    assert not strided[..., :4].is_contiguous()  # as the vision model passes them: boxes need not be contiguous
    ours, reference = box_pool(ours_in, strided[..., :4], SIZE, max_touched_share=float("inf")), dense(reference_in, boxes)
    assert ours.dtype == dtype and ours.shape == (3, 9, 70 + 3 + 128)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    for empty in [(0, 1), (0, 2), (1, 0), (1, 1)]:  # zero-area, reversed, NaN and outside boxes pool to zeros
        assert ours[empty].abs().max() == 0
    grad = torch.randn_like(reference)
    ours.backward(grad)
    reference.backward(grad)
    for a, b in zip(ours_in, reference_in):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_the_rule_keeps_whole_image_boxes_on_the_dense_path():
    features = levels()
    small = torch.tensor([[[10.0, 10.0, 20.0, 18.0]] * 4] * 3)
    whole = torch.tensor([[[0.0, 0.0, 128.0, 96.0]] * 4] * 3)
    assert box_pool(features, small, SIZE) is not None and box_pool(features, whole, SIZE) is None
    assert box_pool(features, whole, SIZE, max_touched_share=float("inf")) is not None
    assert box_pool([f.to(torch.bfloat16) for f in features], small, SIZE) is None  # bf16: the dense path
    assert box_pool(features, small[:, :0], SIZE) is None  # no regions


def test_the_encoder_pools_boxes_by_the_kernel_and_builds_masks_only_when_read(monkeypatch):
    tiny = dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2, img_size=32)
    encoder = EncoderConfig(backbone="swin_tiny_patch4_window7_224", feature_levels=[0, 1], backbone_kwargs=tiny).build().eval()
    features = levels()[:2]
    boxes = awkward_boxes()
    calls = []
    monkeypatch.setattr("fineregion_pl.model.encoder.box_pool", lambda *a: calls.append(1) or box_pool(*a, max_touched_share=float("inf")))
    z, masks = encoder.pool(features, boxes, SIZE)
    assert calls == [1]
    torch.testing.assert_close(z, dense(features, boxes), atol=1e-5, rtol=0)
    torch.testing.assert_close(masks[1], box_masks(boxes, SIZE, (6, 8)))
    _, perturbed = encoder.pool(features, boxes, SIZE, mask_transform=lambda m: m * 0.5)  # not exact for the kernel: dense
    assert calls == [1] and isinstance(perturbed, list)
