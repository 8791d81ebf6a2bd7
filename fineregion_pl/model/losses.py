"""Training losses of FineRegion-LM (paper eqs. 7-9) as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fineregion_pl.model.boxes import box_area, pairwise_intersection


def mask_loss(attn_logits: Tensor, masks: Tensor, region_valid: Tensor, eps: float = 1e-8) -> Tensor:
    """``L_mask``: KL divergence from the normalised region mask to the region attention map.

    ``L_mask = 1/|V| * sum_{i in V} KL(M_i / sum(M_i) || softmax(A_i))`` over valid regions ``V``,
    where ``A_i`` are the attention logits over the cells of one feature level and ``M_i`` the
    (soft) mask on that level. It is 0 exactly when the attention matches the mask's shape and
    grows as attention mass leaves the region.

    Args:
        attn_logits: ``(B, N, h, w)``.
        masks: ``(B, N, h, w)`` non-negative.
        region_valid: ``(B, N)`` bool.
    """
    b, n = region_valid.shape
    log_attn = F.log_softmax(attn_logits.reshape(b, n, -1).float(), dim=-1)
    target = masks.reshape(b, n, -1).float()
    target = target / target.sum(-1, keepdim=True).clamp(min=eps)
    kl = (target * (torch.log(target.clamp(min=eps)) - log_attn)).sum(-1)
    valid = region_valid & (masks.reshape(b, n, -1).sum(-1) > 0)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def attention_inside(attn_logits: Tensor, masks: Tensor, region_valid: Tensor) -> Tensor:
    """Mean share of attention mass that falls inside each valid region's mask (a metric)."""
    b, n = region_valid.shape
    attn = attn_logits.reshape(b, n, -1).float().softmax(-1)
    inside = (attn * (masks.reshape(b, n, -1) > 0)).sum(-1)
    valid = region_valid & (masks.reshape(b, n, -1).sum(-1) > 0)
    return (inside * valid).sum() / valid.sum().clamp(min=1)


CONSISTENCY_PAIRINGS = ("paper", "iou", "views")


def consistency_loss(representations: Tensor, boxes: Tensor, region_valid: Tensor, pairing: str = "paper") -> Tensor:
    """``L_consistency`` (eq. 9) over pairs of regions of the same image whose boxes intersect.

    ``L = mean_b 1/N_b * sum_{i != j} w_ij * ||C_i - C_j||^2`` where ``N_b`` is the number of
    valid regions of image ``b`` and ``w_ij = 1[R_i ∩ R_j != ∅]`` (``pairing="paper"``, eq. 9 as
    written: it pulls the captions of *different* intersecting objects together) or
    ``w_ij = IoU(R_i, R_j)`` (``pairing="iou"``: barely overlapping boxes, usually different
    objects, barely pulled). It is 0 when no boxes intersect and when the representations of
    intersecting regions are identical. The diagonal (``i = j``) is 0 anyway. (The third pairing,
    two dynamic views of one region, is :func:`view_consistency_loss`.)

    Args:
        representations: ``(B, N, D)`` differentiable caption representations ``C_i``.
        boxes: ``(B, N, 4)`` xyxy.
        region_valid: ``(B, N)`` bool.
        pairing: ``paper`` or ``iou``.
    """
    if pairing not in ("paper", "iou"):
        raise ValueError(f"consistency pairing over region pairs must be 'paper' or 'iou', got {pairing!r}")
    valid = region_valid.bool()
    inter = pairwise_intersection(boxes)
    pair = (inter > 0) & valid[:, :, None] & valid[:, None, :]
    pair = pair & ~torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    b, i, j = pair.nonzero(as_tuple=True)
    sq_dist = (representations[b, i].float() - representations[b, j].float()).pow(2).sum(-1)
    if pairing == "iou":
        area = box_area(boxes).float()
        sq_dist = sq_dist * (inter[b, i, j] / (area[b, i] + area[b, j] - inter[b, i, j]).clamp(min=1e-6)).float()
    per_image = torch.zeros(valid.shape[0], device=representations.device, dtype=sq_dist.dtype).index_add(0, b, sq_dist)
    per_image = per_image / valid.sum(1).clamp(min=1)
    has_regions = valid.any(1)
    return (per_image * has_regions).sum() / has_regions.sum().clamp(min=1)


def view_consistency_loss(view_a: Tensor, view_b: Tensor) -> Tensor:
    """Consistency between two dynamic views of the same regions: ``mean_i ||C_i^a - C_i^b||^2``
    over ``(R, D)`` caption representations of the same ``R`` regions pooled with two independent
    perturbations (0 for no regions)."""
    if view_a.shape[0] == 0:
        return view_a.sum() * 0.0
    return (view_a.float() - view_b.float()).pow(2).sum(-1).mean()
