"""The region attention map that ``L_mask`` supervises (paper eq. 7, first term)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RegionAttention(nn.Module):
    """Predicts where a region is from its pooled feature: one attention map per region.

    ``logits[b, n, y, x] = <W_q z[b, n], W_k F[b, y, x]> / sqrt(a)``; the attention map is the
    softmax of the logits over all cells. The map is produced by the model from the region's
    own features, so ``L_mask`` (see :func:`fineregion_pl.model.losses.mask_loss`) teaches the features
    to say where the region is, and ``softmax`` mass inside the mask measures how well they do.

    Args:
        z_dim: size of the pooled region feature ``z``.
        feature_dim: channels of the feature level the map is drawn on.
        attn_dim: size of the query/key space.
    """

    def __init__(self, z_dim: int, feature_dim: int, attn_dim: int = 64):
        super().__init__()
        self.query = nn.Linear(z_dim, attn_dim)
        self.key = nn.Linear(feature_dim, attn_dim)
        self.scale = 1.0 / math.sqrt(attn_dim)

    def forward(self, z: Tensor, features: Tensor) -> Tensor:
        """``z (B, N, D)`` and ``features (B, h, w, d)`` to attention logits ``(B, N, h, w)``."""
        b, h, w, _ = features.shape
        q = self.query(z)
        k = self.key(features).reshape(b, h * w, -1)
        return (torch.bmm(q, k.transpose(1, 2)) * self.scale).reshape(b, -1, h, w)
