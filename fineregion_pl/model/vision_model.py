"""The stage-1 model: region encoder, region category head and region attention map, as one ``nn.Module``.

Stage 1 trains it; stage 2 loads it from a stage-1 checkpoint and feeds its region features to
the language model. It knows nothing of Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from fineregion_pl.model.attention_pooling import attention_pool, attention_weights, pooling_logits
from fineregion_pl.model.boxes import sanitize_boxes
from fineregion_pl.model.dynamic_masking import DynamicMasking, MaskingMode, perturb_boxes, perturb_masks
from fineregion_pl.model.encoder import EncoderConfig, RegionFeatures, level_segmentation, whole_image_boxes
from fineregion_pl.model.region_attention import RegionAttention
from fineregion_pl.model.region_masks import box_masks, merge_masks, rasterize_segmentations


@dataclass
class RegionOutputs:
    """Outputs of :class:`RegionVisionModel` for a batch.

    Attributes:
        regions: pooled features, context, masks and feature maps (see ``RegionFeatures``).
        logits: ``(B, N, C)`` region category logits.
        attn_logits: ``(B, N, h, w)`` region attention logits on the finest pooled level.
        target_masks: ``(B, N, h, w)`` clean region masks on that level (the ``L_mask`` target).
        boxes: ``(B, N, 4)`` the sanitised clean boxes.
        region_valid: ``(B, N)`` validity after sanitising (degenerate boxes switched off).
    """

    regions: RegionFeatures
    logits: Tensor
    attn_logits: Tensor
    target_masks: Tensor
    boxes: Tensor
    region_valid: Tensor


class RegionVisionModel(nn.Module):
    """Swin region encoder + category head + region attention (the stage-1 network).

    Args:
        encoder: backbone choice, see :class:`~fineregion_pl.model.encoder.EncoderConfig`.
        num_classes: number of region categories.
        head_hidden: hidden size of the category MLP.
        attn_dim: query/key size of the region attention map.
    """

    def __init__(self, encoder: EncoderConfig, num_classes: int, head_hidden: int = 256, attn_dim: int = 64):
        super().__init__()
        self.encoder = encoder.build()
        dim = self.encoder.out_dim
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, head_hidden), nn.GELU(), nn.Linear(head_hidden, num_classes))
        self.attention = RegionAttention(dim, self.encoder.level_dims[0], attn_dim)
        self.attention_dilation = 1  # cells around the mask that attention pooling may reach

    @property
    def out_dim(self) -> int:
        return self.encoder.out_dim

    def match_buffers_to_parameters(self) -> int:
        """Cast floating buffers (Swin's ``attn_mask``) to the dtype of the parameters; returns how many changed.

        A strategy that casts parameters but not buffers (DeepSpeed under ``bf16-mixed``) would
        otherwise leave an fp32 mask that turns bf16 attention scores back into fp32, and the next
        matmul with bf16 values fails.
        """
        dtype = next(self.parameters()).dtype
        changed = 0
        for buffer in self.buffers():
            if buffer.is_floating_point() and buffer.dtype != dtype:
                buffer.data = buffer.data.to(dtype)
                changed += 1
        return changed

    def forward(
        self,
        images: Tensor,
        boxes: Tensor,
        region_valid: Tensor,
        masking: MaskingMode = "dynamic",
        dynamic: Optional[DynamicMasking] = None,
        generator: Optional[torch.Generator] = None,
        segmentations: Optional[list] = None,
    ) -> RegionOutputs:
        """Encode images, pool every region, classify it and predict its attention map.

        Args:
            images: ``(B, 3, H, W)``.
            boxes: ``(B, N, 4)`` xyxy pixels of ``images`` (raw: NaN, reversed or outside boxes are
                clamped or switched off here).
            region_valid: ``(B, N)`` bool.
            masking: ``none`` | ``hard`` | ``dynamic``.
            dynamic: perturbation strengths; applied only when training with ``masking="dynamic"``.
            generator: random source of the perturbations.
            segmentations: per image, per region a COCO polygon list / RLE in model-input pixels
                or ``None``; where given, the region's mask is its segmentation (box jitter does
                not move it; dilation/erosion and context mixing still apply).
        """
        height, width = images.shape[-2:]
        boxes, region_valid = sanitize_boxes(boxes, region_valid, width, height)
        perturb = self.training and masking == "dynamic" and dynamic is not None
        dynamic = dynamic.scaled() if perturb else dynamic
        pool_boxes, mask_transform = boxes, None
        if masking == "none":
            pool_boxes = whole_image_boxes(boxes, (height, width))
        elif perturb:
            jittered, _ = sanitize_boxes(perturb_boxes(boxes, dynamic, generator), region_valid, width, height)
            pool_boxes = torch.where(region_valid[..., None], jittered, boxes)
            mask_transform = partial(perturb_masks, config=dynamic, generator=generator)
        full = None
        if segmentations is not None and masking != "none" and any(s is not None for image in segmentations for s in image):
            full = rasterize_segmentations(segmentations, (height, width), boxes.shape[1]).to(boxes.device)
        features = self.encoder.forward_features(images)
        z, masks = self.encoder.pool(features, pool_boxes, (height, width), masking == "hard", mask_transform, full)
        attn_logits = self.attention(z, features[0])
        if self.encoder.pooling == "attention":  # the map L_mask supervises is the map z is pooled with
            attn_logits = pooling_logits(attn_logits, masks[0], self.attention_dilation)
            z = attention_pool(features, attention_weights(attn_logits, masks[0]))
        regions = RegionFeatures(z=z, context=self.encoder.context(features), masks=masks, features=features)
        target = box_masks(boxes, (height, width), features[0].shape[1:3]).to(z.dtype)
        if full is not None:
            target = merge_masks(level_segmentation(full, target.shape[-2:], False, target.dtype), target)
        return RegionOutputs(
            regions=regions,
            logits=self.head(z),
            attn_logits=attn_logits,
            target_masks=target,
            boxes=boxes,
            region_valid=region_valid,
        )
