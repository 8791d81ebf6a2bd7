"""Dynamic region masking: random perturbations of the regions a model pools from while training.

The paper's "dynamic" masking is not specified beyond eq. 2; here it means that, in training
only, each region's pooling mask is drawn from a distribution around its box instead of being the
box itself, so the region feature ``z_i`` cannot rely on the exact box edges:

- ``box_jitter``: each box edge moves by ``U(-j, j)`` times the box's side along that axis;
- ``box_scale``: the box is scaled about its centre by ``U(1 - s, 1 + s)`` (both axes together),
  which on the feature grid is a dilation (``> 1``) or an erosion (``< 1``) of the mask;
- ``mask_morph``: with this probability a region's mask is dilated, and with the same
  probability eroded, by one cell (3x3 max-pool of the mask, or of its complement); this works
  for box and segmentation masks alike (an erosion that would empty a mask is not applied);
- ``context_drop``: with this probability a region's pooling ignores everything outside the
  region (its mask is used as given); otherwise the mask keeps a floor on the whole image, so the
  pooled feature mixes in context. (Off by default: ``context_drop = 1``.) ``context_mode``
  says what the floor is: ``flat`` (the default, as before) a ``context_weight`` per cell, so a
  small box is mostly context and a large one mostly itself; ``area`` a floor of
  ``context_weight * sum(M_i) / (h * w - sum(M_i))`` per cell, so the context outside the region
  adds up to ``context_weight`` times the region's own mass whatever the box's size;
- ``strength``: one knob that multiplies ``box_jitter``, ``box_scale`` and ``mask_morph``
  (1: the values as given; 0: no perturbation, soft masks only; 2: twice as strong).

Defaults (``DynamicMasking()``): jitter 0.1 and scale 0.15 of the box side, no morphing, no context,
strength 1. The ablation recipes set their own (``configs/ablations/*.yaml``: 0.05 / 0.05, about
1.5 px on the easy benchmark; the hard suite: 0.2 / 0.3, the noise of its sigma-0.2 test boxes).

The supervised target of ``L_mask`` is always the clean, unperturbed region. Everything is off
at evaluation (``model.eval()``) and when ``masking`` is ``none`` or ``hard``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MaskingMode = Literal["none", "hard", "dynamic"]
"""How regions are pooled: ``dynamic`` (soft masks, perturbed while training: the method), ``hard``
(fixed binary masks) or ``none`` (every region pooled from the whole image: no region information)."""


@dataclass
class DynamicMasking:
    """Strengths of the training-time region perturbations (see the module docstring)."""

    box_jitter: float = 0.1
    box_scale: float = 0.15
    mask_morph: float = 0.0
    context_drop: float = 1.0
    context_weight: float = 0.05
    context_mode: Literal["flat", "area"] = "flat"
    strength: float = 1.0

    def scaled(self) -> DynamicMasking:
        """The perturbations with ``strength`` applied (jitter, scale and morph probability multiplied)."""
        from dataclasses import replace

        if self.context_mode not in ("flat", "area"):
            raise ValueError(f"dynamic.context_mode must be 'flat' or 'area', got {self.context_mode!r}")
        if self.strength == 1.0:
            return self
        return replace(self, box_jitter=self.box_jitter * self.strength, box_scale=self.box_scale * self.strength,
                       mask_morph=min(0.5, self.mask_morph * self.strength), strength=1.0)


def perturb_boxes(boxes: Tensor, config: DynamicMasking, generator: Optional[torch.Generator] = None) -> Tensor:
    """Randomly jitter and scale ``(B, N, 4)`` xyxy boxes; the caller clamps them to the image."""
    size = (boxes[..., 2:] - boxes[..., :2]).repeat(1, 1, 2)
    jitter = (torch.rand(boxes.shape, generator=generator, device=boxes.device) * 2 - 1) * config.box_jitter
    boxes = boxes + jitter * size
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) / 2
    scale = 1 + (torch.rand(boxes.shape[:-1] + (1,), generator=generator, device=boxes.device) * 2 - 1) * config.box_scale
    return torch.cat([centre - half * scale, centre + half * scale], dim=-1)


def add_context(masks: Tensor, config: DynamicMasking, generator: Optional[torch.Generator] = None) -> Tensor:
    """Give a random subset of regions (probability ``1 - context_drop``) a floor of context weight."""
    if config.context_drop >= 1.0:
        return masks
    keep_context = torch.rand(masks.shape[:2], generator=generator, device=masks.device) >= config.context_drop
    mass = masks.sum((-2, -1), keepdim=True)
    per_cell = mass / (masks.shape[-2] * masks.shape[-1] - mass).clamp(min=1.0) if config.context_mode == "area" else (mass > 0).to(masks.dtype)
    floor = config.context_weight * keep_context[..., None, None].to(masks.dtype) * per_cell
    return torch.maximum(masks, floor)


def morph_masks(masks: Tensor, config: DynamicMasking, generator: Optional[torch.Generator] = None) -> Tensor:
    """Dilate (probability ``mask_morph``) or erode (same probability) each region's mask by one cell."""
    if config.mask_morph <= 0:
        return masks
    b, n, h, w = masks.shape
    flat = masks.reshape(b * n, 1, h, w)
    dilated = F.max_pool2d(flat, 3, stride=1, padding=1).reshape(b, n, h, w)
    eroded = (1 - F.max_pool2d(1 - flat, 3, stride=1, padding=1)).reshape(b, n, h, w)
    eroded = torch.where(eroded.sum((-2, -1), keepdim=True) > 0, eroded, masks)  # never erode a mask away
    draw = torch.rand(b, n, 1, 1, generator=generator, device=masks.device)
    out = torch.where(draw < config.mask_morph, dilated, masks)
    return torch.where(draw > 1 - config.mask_morph, eroded, out)


def perturb_masks(masks: Tensor, config: DynamicMasking, generator: Optional[torch.Generator] = None) -> Tensor:
    """The mask-level perturbations of dynamic masking: dilation/erosion, then context mixing."""
    return add_context(morph_masks(masks, config, generator), config, generator)
