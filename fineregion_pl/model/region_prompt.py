"""The region prompt: region features to soft tokens in the language model's embedding space (eq. 5).

For region ``i`` the prompt is ``k + 1`` vectors of the LM's embedding size:

- ``P_i`` (``k`` tokens). ``adaptive``: ``P_i = W_2 GELU(W_z LN(z_i) + W_c LN(c) + W_g g_i)``
  reshaped to ``k`` tokens (an MLP of the three inputs, each with its own first-layer projection), where
  ``z_i`` is the pooled region feature, ``c`` the image context (mean of the whole feature map)
  and ``g_i`` the box geometry (normalised corners, width, height, sqrt(area)). The prompt thus
  changes with the region's content, its surroundings and where it is. ``static``: ``P`` is ``k``
  learned vectors, the same for every region (the paper's "no adaptive prompts" row).
  ``static_geometry``: ``P_i = P + W_2 GELU(W_g g_i)``: learned tokens that follow only the box
  geometry, with the pair token too, so against ``adaptive`` the one thing that changes is
  whether the prompt adapts to the region's content and context (``static`` also loses the
  geometry and the pair token, which decide spatial questions).
- ``r_i`` (1 token) = ``Linear(z_i)``: the region feature itself, in both modes, so a static
  prompt still sees the region (``T_i = Prompt(z_i, P)``).
- For two-region tasks (spatial questions) an adaptive prompt adds one pair token
  ``Linear([g_a ; g_b ; g_a - g_b])`` after the second region: where the two boxes are relative to
  each other, which a language model cannot read off two separate groups of soft tokens easily.

Every token passes a LayerNorm and is scaled to the typical norm of the LM's own embeddings, so
the soft tokens start at the scale the LM expects.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

PromptMode = Literal["adaptive", "static", "static_geometry"]
GEOMETRY_DIM = 7


class RegionPrompt(nn.Module):
    """Region features to ``k + 1`` soft prompt tokens.

    Args:
        z_dim: size of the pooled region feature and of the image context.
        lm_dim: the language model's embedding size.
        num_tokens: ``k``, the number of prompt tokens ``P``.
        mode: ``adaptive`` or ``static``.
        hidden: hidden size of the adaptive generator MLP.
        embed_scale: target RMS of each token's entries (the LM's embedding RMS).
    """

    def __init__(self, z_dim: int, lm_dim: int, num_tokens: int = 4, mode: PromptMode = "adaptive", hidden: int = 512, embed_scale: float = 1.0):
        super().__init__()
        self.mode, self.num_tokens, self.lm_dim = mode, num_tokens, lm_dim
        self.region_token = nn.Sequential(nn.LayerNorm(z_dim), nn.Linear(z_dim, lm_dim))
        if mode == "adaptive":
            # each input gets its own projection into the hidden layer: normalised together, the 7
            # geometry numbers would be drowned by the hundreds of feature channels
            self.from_region = nn.Sequential(nn.LayerNorm(z_dim), nn.Linear(z_dim, hidden))
            self.from_context = nn.Sequential(nn.LayerNorm(z_dim), nn.Linear(z_dim, hidden, bias=False))
            self.from_geometry = nn.Linear(GEOMETRY_DIM, hidden, bias=False)
            self.generator = nn.Sequential(nn.GELU(), nn.Linear(hidden, num_tokens * lm_dim))
            self.pair = nn.Linear(3 * GEOMETRY_DIM, lm_dim)
        elif mode in ("static", "static_geometry"):
            self.static = nn.Parameter(torch.randn(num_tokens, lm_dim) * 0.02)
            if mode == "static_geometry":
                self.from_geometry = nn.Linear(GEOMETRY_DIM, hidden)
                self.generator = nn.Sequential(nn.GELU(), nn.Linear(hidden, num_tokens * lm_dim))
                self.pair = nn.Linear(3 * GEOMETRY_DIM, lm_dim)
        else:
            raise ValueError(f"prompt mode must be 'adaptive', 'static' or 'static_geometry', got {mode!r}")
        self.norm = nn.LayerNorm(lm_dim)
        self.register_buffer("embed_scale", torch.tensor(float(embed_scale)), persistent=False)

    @property
    def length(self) -> int:
        """Number of soft tokens per region."""
        return self.num_tokens + 1

    def forward(self, z: Tensor, context: Tensor, geometry: Tensor) -> Tensor:
        """Prompt tokens for ``R`` regions.

        Args:
            z: ``(R, z_dim)`` region features.
            context: ``(R, z_dim)`` the context of each region's image.
            geometry: ``(R, 7)`` box geometry (:func:`fineregion_pl.model.boxes.box_geometry`).

        Returns:
            ``(R, k + 1, lm_dim)``: ``[P_i ; r_i]``.
        """
        r = self.region_token(z)[:, None, :]
        if self.mode == "adaptive":
            hidden = self.from_region(z) + self.from_context(context) + self.from_geometry(geometry.to(z.dtype))
            p = self.generator(hidden).reshape(z.shape[0], self.num_tokens, self.lm_dim)
        elif self.mode == "static_geometry":
            p = self.static[None] + self.generator(self.from_geometry(geometry.to(z.dtype))).reshape(z.shape[0], self.num_tokens, self.lm_dim)
        else:
            p = self.static[None].expand(z.shape[0], -1, -1)
        return self.norm(torch.cat([p, r], dim=1)) * self.embed_scale

    def pair_token(self, geometry_a: Tensor, geometry_b: Tensor) -> Optional[Tensor]:
        """For two-region tasks: one token ``Linear([g_a ; g_b ; g_a - g_b])`` of the two boxes'
        geometry, ``(R, 1, lm_dim)`` (adaptive and static_geometry prompts; ``None`` for static prompts)."""
        if self.mode == "static":
            return None
        pair = torch.cat([geometry_a, geometry_b, geometry_a - geometry_b], dim=-1).to(self.pair.weight.dtype)
        return self.norm(self.pair(pair))[:, None, :] * self.embed_scale
