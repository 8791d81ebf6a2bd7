"""Attention pooling: the region attention map that ``L_mask`` supervises is the map the region is pooled with.

Without it (``pooling: mask``) ``L_mask`` trains a map nothing downstream reads: pooling and
prompts use the masked average ``z_i``. With ``pooling: attention``, for every region:

1. ``z0_i`` = the masked average (the query, as before);
2. the pooling logits ``a_i = <W_q z0_i, W_k F> / sqrt(d) + OUTSIDE * (1 - dilate(M_i))`` on the
   finest level: the region attention's logits, pushed down by ``OUTSIDE`` (8, a factor
   ``e^-8 ~ 3e-4``) outside the region's mask dilated by ``dilation`` cells, so attention can move
   within and just around the box and (nearly) never leaves it. A finite push, not ``log 0``:
   while training, a perturbed box may miss part of the clean region ``L_mask`` targets, and the
   loss must stay finite there. Empty masks (padding) pool to zeros;
3. ``A_i = softmax(a_i)`` over cells; ``z_i`` = per level, the ``A_i``-weighted sum of that level's
   features (``A_i`` area-averaged onto coarser grids and renormalised).

``L_mask`` is then computed on ``a_i`` itself (the vision model returns it as ``attn_logits``):
the map it supervises is the map the pooling uses, so switching ``L_mask`` off changes what is
pooled, not only an unused head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dilate(masks: Tensor, cells: int) -> Tensor:
    """``(B, N, h, w)`` masks dilated by ``cells`` cells (max-pool of the binary support)."""
    support = (masks > 0).to(masks.dtype)
    if cells <= 0:
        return support
    b, n, h, w = masks.shape
    k = 2 * cells + 1
    return F.max_pool2d(support.reshape(b * n, 1, h, w), k, stride=1, padding=cells).reshape(b, n, h, w)


OUTSIDE = 8.0


def pooling_logits(attn_logits: Tensor, masks: Tensor, dilation: int = 1) -> Tensor:
    """The attention logits pushed down by :data:`OUTSIDE` outside each region's dilated mask: ``(B, N, h, w)``."""
    allowed = dilate(masks, dilation)
    return attn_logits.float() - OUTSIDE * (1 - allowed.float())


def attention_weights(logits: Tensor, masks: Tensor) -> Tensor:
    """Softmax over cells of ``(B, N, h, w)`` logits; regions whose ``masks`` are empty get zeros."""
    b, n, h, w = logits.shape
    nonempty = (masks.reshape(b, n, -1) > 0).any(-1, keepdim=True)
    return (logits.reshape(b, n, h * w).softmax(-1) * nonempty).reshape(b, n, h, w)


def attention_pool(features: list[Tensor], weights: Tensor) -> Tensor:
    """Pool every level with the finest level's attention weights ``(B, N, h0, w0)``: ``(B, N, D)``.

    On a coarser level the weights are area-averaged onto its grid and renormalised to sum to 1
    (regions with all-zero weights stay zero).
    """
    parts = []
    b, n, h0, w0 = weights.shape
    for f in features:
        h, w = f.shape[1:3]
        level = weights if (h, w) == (h0, w0) else F.adaptive_avg_pool2d(weights.reshape(b * n, 1, h0, w0), (h, w)).reshape(b, n, h, w)
        level = level / level.sum((-2, -1), keepdim=True).clamp(min=1e-12)
        parts.append(torch.bmm(level.reshape(b, n, h * w).to(f.dtype), f.reshape(b, h * w, -1)))
    return torch.cat(parts, dim=-1)
