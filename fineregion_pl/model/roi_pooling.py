"""RoIAlign region features, the GPT4RoI / ControlCap way: a baseline to masked pooling.

``roi_align`` (1x1 per level, the older baseline) averages the box like a hard mask does.
``roi_align_7x7`` keeps the box's layout: torchvision RoIAlign of each box to a 7x7 grid per
level, flattened and projected back to the level's width by a learned linear layer (as GPT4RoI
projects its RoI features to a token), so ``z`` has the same size as masked pooling's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def roi_grid(features: list[Tensor], boxes: Tensor, image_size: tuple[int, int], output_size: int) -> list[Tensor]:
    """Per level, RoIAlign of every box to ``output_size x output_size``: ``(B, N, d * s * s)``; padding rows zero."""
    from torchvision.ops import roi_align

    b, n, _ = boxes.shape
    index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(n)[:, None]
    rois = torch.cat([index, boxes.reshape(b * n, 4)], dim=1)
    valid = (boxes[..., 2:] > boxes[..., :2]).all(-1, keepdim=True)
    parts = []
    for f in features:
        scale = f.shape[2] / image_size[1]
        pooled = roi_align(f.permute(0, 3, 1, 2), rois.to(f.dtype), output_size=output_size, spatial_scale=scale, sampling_ratio=2, aligned=True)
        parts.append(pooled.reshape(b, n, -1) * valid)
    return parts


class RoIAlignPooling(nn.Module):
    """RoIAlign 7x7 per level, then ``Linear(d * 49 -> d)`` per level; levels concatenated: ``(B, N, D)``.

    Args:
        level_dims: channels of each pooled level.
        output_size: RoIAlign grid side (7).
    """

    def __init__(self, level_dims: list[int], output_size: int = 7):
        super().__init__()
        self.output_size = output_size
        self.project = nn.ModuleList(nn.Linear(d * output_size * output_size, d) for d in level_dims)

    def forward(self, features: list[Tensor], boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        parts = roi_grid(features, boxes, image_size, self.output_size)
        valid = (boxes[..., 2:] > boxes[..., :2]).all(-1, keepdim=True)
        return torch.cat([proj(p) for proj, p in zip(self.project, parts)], dim=-1) * valid
