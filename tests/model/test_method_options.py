"""The hard suite's method options: attention pooling, RoIAlign 7x7, masking strength, area-normalised context, consistency pairings."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder_config
from torchvision.ops import roi_align

from fineregion_pl.model.attention_pooling import OUTSIDE, dilate
from fineregion_pl.model.dynamic_masking import DynamicMasking, add_context, perturb_boxes
from fineregion_pl.model.losses import consistency_loss, mask_loss, view_consistency_loss
from fineregion_pl.model.region_masks import box_masks
from fineregion_pl.model.vision_model import RegionVisionModel


def _batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 4.0, 30.0, 30.0], [20.0, 8.0, 60.0, 40.0], [0.0, 0.0, 0.0, 0.0]],
                          [[10.0, 30.0, 40.0, 62.0], [33.0, 2.0, 50.0, 20.0], [1.0, 1.0, 63.0, 63.0]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    return images, boxes, valid


def test_attention_pooling_pools_with_the_map_that_l_mask_supervises():
    torch.manual_seed(0)
    model = RegionVisionModel(tiny_encoder_config(pooling="attention"), num_classes=5).eval()
    images, boxes, valid = _batch()
    out = model(images, boxes, valid, masking="hard")
    f0 = out.regions.features[0]
    weights = out.attn_logits.flatten(2).softmax(-1)
    level0 = torch.bmm(weights, f0.flatten(1, 2))
    d0 = f0.shape[-1]
    assert torch.allclose(out.regions.z[..., :d0][valid], level0[valid], atol=1e-5)  # z's finest level = the supervised map's weighted sum
    assert torch.all(out.regions.z[0, 2] == 0)  # padding pools to zeros
    outside = dilate(out.regions.masks[0], 1) == 0
    inside_logits = out.attn_logits.masked_fill(outside, float("-inf")).flatten(2).logsumexp(-1)
    outside_logits = out.attn_logits.masked_fill(~outside, float("-inf")).flatten(2).logsumexp(-1)
    assert (outside_logits - inside_logits)[valid].max() < -OUTSIDE + 6  # attention (nearly) stays in the dilated box
    assert torch.isfinite(mask_loss(out.attn_logits, out.target_masks, out.region_valid))


def test_attention_pooling_trains_the_attention_from_any_loss_on_z_and_mask_pooling_does_not():
    images, boxes, valid = _batch()
    grads = {}
    for pooling in ("attention", "mask"):
        torch.manual_seed(0)
        model = RegionVisionModel(tiny_encoder_config(pooling=pooling), num_classes=5)
        out = model(images, boxes, valid, masking="dynamic", dynamic=DynamicMasking())
        out.logits[valid].sum().backward()
        grads[pooling] = model.attention.query.weight.grad
    assert grads["mask"] is None and grads["attention"].abs().sum() > 0


def test_mask_pooling_is_unchanged_by_the_options():
    torch.manual_seed(0)
    model = RegionVisionModel(tiny_encoder_config(), num_classes=5).eval()
    images, boxes, valid = _batch()
    out = model(images, boxes, valid, masking="dynamic", dynamic=DynamicMasking(strength=3.0, context_mode="area"))
    assert torch.equal(out.attn_logits, model.attention(out.regions.z, out.regions.features[0]))  # eval: no perturbation at all


def test_roi_align_7x7_keeps_the_box_layout_and_projects_to_the_pooled_width():
    torch.manual_seed(0)
    model = RegionVisionModel(tiny_encoder_config(pooling="roi_align_7x7"), num_classes=5).eval()
    images, boxes, valid = _batch()
    out = model(images, boxes, valid, masking="hard")
    assert out.regions.z.shape == (2, 3, model.out_dim) and torch.all(out.regions.z[0, 2] == 0)
    f = out.regions.features[0]
    grid = roi_align(f.permute(0, 3, 1, 2), [boxes[0, :1]], output_size=7, spatial_scale=f.shape[2] / 64, sampling_ratio=2, aligned=True)
    proj = model.encoder.roi.project[0]
    assert proj.in_features == f.shape[-1] * 49
    assert torch.allclose(out.regions.z[0, 0, : f.shape[-1]], proj(grid.reshape(1, -1))[0], atol=1e-5)
    with pytest.raises(ValueError, match="encoder pooling must be one of"):
        RegionVisionModel(tiny_encoder_config(pooling="roi_align_5x5"), num_classes=5)


def test_masking_strength_multiplies_every_perturbation():
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0]]]).expand(1, 500, 4).contiguous()
    spread = {}
    for strength in (0.0, 1.0, 2.0):
        config = DynamicMasking(box_jitter=0.1, box_scale=0.0, strength=strength).scaled()
        moved = perturb_boxes(boxes, config, torch.Generator().manual_seed(0))
        spread[strength] = float((moved - boxes).abs().max())
    assert spread[0.0] == 0.0 and 3.5 < spread[1.0] <= 4.0 and 7.0 < spread[2.0] <= 8.0  # 0.1 / 0.2 of a 40 px side
    assert DynamicMasking().scaled() == DynamicMasking()  # the default is today's behaviour
    with pytest.raises(ValueError, match="context_mode must be"):
        DynamicMasking(context_mode="both").scaled()


def test_area_context_gives_every_box_size_the_same_context_share():
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 48.0, 48.0]]])
    masks = box_masks(boxes, (64, 64), (16, 16))
    share = {}
    for mode in ("flat", "area"):
        mixed = add_context(masks, DynamicMasking(context_drop=0.0, context_weight=0.05, context_mode=mode))
        share[mode] = ((mixed - masks).sum((-2, -1)) / mixed.sum((-2, -1)))[0]
    assert share["flat"][0] > 5 * share["flat"][1]  # flat: the small box is mostly context
    assert torch.allclose(share["area"], torch.full((2,), 0.05 / 1.05), rtol=0.02)  # context = 5% of the region's mass, any size


def test_consistency_pairings():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [40.0, 40.0, 50.0, 50.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    reps = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]])
    paper = consistency_loss(reps, boxes, valid)
    iou = consistency_loss(reps, boxes, valid, "iou")
    assert torch.isclose(paper, torch.tensor(2 * 1.0 / 3))  # pairs (0,1), (1,0), distance 1 each, over 3 regions
    assert torch.isclose(iou, paper * (50 / 150))  # weighted by IoU 1/3
    a = torch.randn(4, 8)
    assert view_consistency_loss(a, a) == 0 and torch.isclose(view_consistency_loss(a, a + 1), torch.tensor(8.0))
    with pytest.raises(ValueError, match="must be 'paper' or 'iou'"):
        consistency_loss(reps, boxes, valid, "views")


def test_static_geometry_prompts_follow_the_box_but_not_the_content():
    from fineregion_pl.model.region_prompt import RegionPrompt

    torch.manual_seed(0)
    prompt = RegionPrompt(z_dim=12, lm_dim=16, num_tokens=3, mode="static_geometry", hidden=8)
    z, context = torch.randn(3, 12), torch.randn(3, 12)
    geometry = torch.rand(1, 7).expand(3, 7).clone()
    geometry[2] += 0.5
    tokens = prompt(z, context, geometry)
    assert torch.allclose(tokens[0, :3], tokens[1, :3]) and not torch.allclose(tokens[0, :3], tokens[2, :3])
    assert not torch.allclose(tokens[0, 3], tokens[1, 3])  # the region token still reads z
    assert prompt.pair_token(geometry, geometry.flip(0)).shape == (3, 1, 16)
    assert RegionPrompt(12, 16, 3, "static", 8).pair_token(geometry, geometry) is None
