"""Training losses of FineRegion-LM (paper eqs. 7-9) as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fineregion_pl.model.boxes import pairwise_intersection


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


def consistency_loss(representations: Tensor, boxes: Tensor, region_valid: Tensor) -> Tensor:
    """``L_consistency`` (eq. 9) over pairs of regions of the same image whose boxes intersect.

    ``L = mean_b 1/N_b * sum_{i != j} 1[R_i ∩ R_j != ∅] * ||C_i - C_j||^2`` where ``N_b`` is the
    number of valid regions of image ``b``. It is 0 when no boxes intersect and when the
    representations of intersecting regions are identical. The diagonal (``i = j``) is 0 anyway.

    Args:
        representations: ``(B, N, D)`` differentiable caption representations ``C_i``.
        boxes: ``(B, N, 4)`` xyxy.
        region_valid: ``(B, N)`` bool.
    """
    valid = region_valid.bool()
    pair = (pairwise_intersection(boxes) > 0) & valid[:, :, None] & valid[:, None, :]
    pair = pair & ~torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    b, i, j = pair.nonzero(as_tuple=True)
    sq_dist = (representations[b, i].float() - representations[b, j].float()).pow(2).sum(-1)
    per_image = torch.zeros(valid.shape[0], device=representations.device, dtype=sq_dist.dtype).index_add(0, b, sq_dist)
    per_image = per_image / valid.sum(1).clamp(min=1)
    has_regions = valid.any(1)
    return (per_image * has_regions).sum() / has_regions.sum().clamp(min=1)
