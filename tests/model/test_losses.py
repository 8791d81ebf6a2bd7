"""L_consistency (eq. 9) and L_mask on hand-built cases, and the consistency gradient reaching the prompt."""

from __future__ import annotations

import pytest
import torch

from fineregion_pl.model.losses import attention_inside, consistency_loss, mask_loss
from fineregion_pl.model.region_prompt import GEOMETRY_DIM, RegionPrompt

OVERLAPPING = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [50.0, 50.0, 60.0, 60.0]]])
VALID = torch.tensor([[True, True, True]])


def test_consistency_is_zero_for_identical_representations_of_intersecting_regions():
    reps = torch.randn(1, 1, 8).expand(1, 3, 8)
    assert consistency_loss(reps, OVERLAPPING, VALID) == 0


def test_consistency_counts_only_intersecting_pairs_of_valid_regions():
    reps = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    # pairs (0,1) and (1,0) intersect: 2 * 25 / N=3 valid regions; region 2 overlaps nothing
    assert consistency_loss(reps, OVERLAPPING, VALID) == pytest.approx(50 / 3)
    # a padded region does not count, nor in N
    assert consistency_loss(reps, OVERLAPPING, torch.tensor([[True, False, True]])) == 0


def test_consistency_is_zero_when_no_boxes_intersect():
    apart = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [30.0, 30.0, 40.0, 40.0]]])  # touching is not intersecting
    assert consistency_loss(torch.randn(1, 3, 8), apart, VALID) == 0


def test_consistency_averages_over_images():
    boxes = torch.cat([OVERLAPPING, OVERLAPPING])
    reps = torch.stack([torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]), torch.zeros(3, 2)])
    valid = torch.tensor([[True, True, True], [False, False, False]])
    assert consistency_loss(reps, boxes, valid) == pytest.approx(50 / 3)  # the empty image is not averaged in


def test_consistency_gradient_reaches_the_prompt():
    torch.manual_seed(0)
    prompt = RegionPrompt(z_dim=6, lm_dim=4, num_tokens=2, mode="adaptive", hidden=8)
    z, context, geometry = torch.randn(3, 6), torch.randn(3, 6), torch.rand(3, GEOMETRY_DIM)
    tokens = prompt(z, context, geometry)  # stand-in for the caption representation: the mean prompt token
    loss = consistency_loss(tokens.mean(1)[None], OVERLAPPING, VALID)
    loss.backward()
    assert loss > 0
    assert prompt.generator[1].weight.grad.abs().sum() > 0 and prompt.region_token[1].weight.grad.abs().sum() > 0


def test_mask_loss_is_zero_when_attention_matches_the_mask_and_grows_outside():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1.0
    perfect = torch.where(masks > 0, torch.zeros(()), torch.full((), -1e4))
    valid = torch.tensor([[True]])
    assert mask_loss(perfect, masks, valid) == pytest.approx(0.0, abs=1e-5)
    assert attention_inside(perfect, masks, valid) == pytest.approx(1.0)
    uniform = torch.zeros(1, 1, 4, 4)
    assert mask_loss(uniform, masks, valid) == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)  # KL(1/4 on 4 cells || 1/16)
    assert attention_inside(uniform, masks, valid) == pytest.approx(0.25)
    outside = torch.where(masks > 0, torch.full((), -5.0), torch.zeros(()))
    assert mask_loss(outside, masks, valid) > mask_loss(uniform, masks, valid)


def test_mask_loss_ignores_padding_and_empty_masks():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, 1:3, 1:3] = 1.0
    logits = torch.randn(1, 2, 4, 4)
    one = mask_loss(logits[:, :1], masks[:, :1], torch.tensor([[True]]))
    assert mask_loss(logits, masks, torch.tensor([[True, True]])) == pytest.approx(float(one))  # the empty mask is skipped
    assert mask_loss(logits, masks, torch.tensor([[False, False]])) == 0
