"""The region encoder: a timm Swin feature pyramid and masked region pooling (paper eqs. 1-4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from torch import Tensor, nn

from fineregion_pl.model.box_integrals import LazyBoxMasks, integrals_exact, pool_boxes, pool_levels, use_integrals
from fineregion_pl.model.box_pool_kernel import box_pool
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.region_masks import area_downsample, box_masks, merge_masks
from fineregion_pl.model.roi_pooling import RoIAlignPooling, roi_grid

POOLINGS = ("mask", "attention", "roi_align", "roi_align_7x7")


@dataclass
class EncoderConfig:
    """Which backbone the region encoder uses (see :class:`RegionEncoder` for each field)."""

    backbone: str = "swin_tiny_patch4_window7_224"
    pretrained: Union[bool, str] = False
    feature_levels: list[int] = field(default_factory=lambda: [1, 2])
    backbone_kwargs: dict = field(default_factory=dict)
    grad_checkpointing: bool = False
    freeze_stages: int = 0
    pooling: str = "mask"

    def build(self) -> RegionEncoder:
        return RegionEncoder(**asdict(self))


@dataclass
class RegionFeatures:
    """What the encoder gives for a batch.

    Attributes:
        z: ``(B, N, D)`` pooled region features, levels concatenated (``D = sum(level_dims)``).
        context: ``(B, D)`` whole-image features (mean over all cells), levels concatenated.
        masks: per level ``(B, N, h_l, w_l)`` the masks that were pooled with.
        features: per level ``(B, h_l, w_l, d_l)`` channels-last feature maps.
    """

    z: Tensor
    context: Tensor
    masks: list[Tensor]
    features: list[Tensor]


def create_backbone(
    name: str,
    pretrained: Union[bool, str] = False,
    feature_levels: Sequence[int] = (1, 2),
    **kwargs,
) -> nn.Module:
    """A timm feature backbone (``features_only``) giving channels-last maps.

    Args:
        name: any timm Swin/SwinV2 model name (other timm models with a feature pyramid work too).
        pretrained: ``False`` (random init), ``True`` (timm's hub weights for ``name``) or a path
            to a local weights file of the full model (a timm ``state_dict`` saved with
            ``torch.save`` or a ``.safetensors`` file), loaded by timm's own loader.
        feature_levels: which stages to return (timm ``out_indices``).
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``embed_dim``, ``depths``...).
    """
    if isinstance(pretrained, (str, Path)) and str(pretrained) not in ("True", "False", "true", "false"):
        path = Path(pretrained)
        if not path.is_file():
            raise BadInputError(f"encoder weights file not found: {path}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        pretrained = True
    elif isinstance(pretrained, str):
        pretrained = pretrained.lower() == "true"
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=tuple(feature_levels), **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BadInputError(f"unknown timm model name {name!r}: see timm.list_models('swin*')") from None
        raise


class RegionEncoder(nn.Module):
    """Swin feature maps once per image, then every region pooled from them in one batched op.

    Args:
        backbone: timm model name, e.g. ``swin_base_patch4_window12_384``.
        pretrained: see :func:`create_backbone`.
        feature_levels: Swin stages whose maps are pooled and concatenated.
        backbone_kwargs: extra ``timm.create_model`` arguments (tiny test models set
            ``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ``img_size`` here).
        grad_checkpointing: recompute backbone activations in backward to save memory.
        freeze_stages: freeze the patch embedding and the first ``k`` stages.
        pooling: ``mask`` (masked average over the region's cells, the method), ``attention``
            (the masked average is the query of the region attention map, and the region is
            pooled with that map: :mod:`~fineregion_pl.model.attention_pooling`, applied by the
            vision model), ``roi_align`` (torchvision RoIAlign of each box to 1x1 per level: the
            GPT4RoI / ControlCap way, a baseline; it ignores the masking mode's mask shape) or
            ``roi_align_7x7`` (RoIAlign 7x7 per level and a learned projection:
            :mod:`~fineregion_pl.model.roi_pooling`).
    """

    def __init__(
        self,
        backbone: str = "swin_tiny_patch4_window7_224",
        pretrained: Union[bool, str] = False,
        feature_levels: Sequence[int] = (1, 2),
        backbone_kwargs: Optional[dict] = None,
        grad_checkpointing: bool = False,
        freeze_stages: int = 0,
        pooling: str = "mask",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"encoder pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.backbone = create_backbone(backbone, pretrained, feature_levels, **(backbone_kwargs or {}))
        self.level_dims: list[int] = list(self.backbone.feature_info.channels())
        if pooling == "roi_align_7x7":
            self.roi = RoIAlignPooling(self.level_dims, 7)
        self.out_dim = sum(self.level_dims)
        self.channels_last = str(getattr(self.backbone, "output_fmt", "NCHW")).endswith("NHWC")
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        self.freeze_stages(freeze_stages)

    @property
    def input_size(self) -> int:
        """The square input side the backbone was built for (``img_size``, else timm's default)."""
        size = getattr(self.backbone, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
        patch_embed = getattr(self.backbone, "patch_embed", None)
        built = getattr(patch_embed, "img_size", None)
        return int(built[0] if isinstance(built, (tuple, list)) else built or size)

    def freeze_stages(self, k: int) -> None:
        """Freeze the patch embedding and stages ``0 .. k-1`` (``k = 0`` freezes nothing)."""
        if k <= 0:
            return
        frozen = {"patch_embed"} | {f"layers_{i}" for i in range(k)}
        for name, child in self.backbone.named_children():
            if name in frozen:
                child.requires_grad_(False)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` images to per-level ``(B, h, w, d)`` channels-last feature maps."""
        maps = self.backbone(images)
        return [m if self.channels_last else m.permute(0, 2, 3, 1) for m in maps]

    def pool(
        self,
        features: list[Tensor],
        boxes: Tensor,
        image_size: tuple[int, int],
        hard: bool = False,
        mask_transform: Optional[Callable[[Tensor], Tensor]] = None,
        segmentations: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Pool every region from every level, into one preallocated ``(B, N, D)``.

        Soft box masks with no ``mask_transform`` and no ``segmentations`` are pooled on the CPU
        by a compiled loop over the cells under each box (:mod:`~fineregion_pl.model.box_pool_kernel`,
        where it builds and the boxes are small enough for it to be cheaper, :func:`~fineregion_pl.model.box_pool_kernel.box_pool`), else from
        streamed prefix sums (:mod:`~fineregion_pl.model.box_integrals`, exact) on the levels
        where the images have enough region slots for that to be the cheaper way
        (:func:`use_integrals`, :func:`~fineregion_pl.model.box_integrals.pool_boxes`); the
        masks are then built only if read. Everything else is the dense masked matmul.

        Args:
            features: per-level ``(B, h, w, d)`` maps from :meth:`forward_features`.
            boxes: ``(B, N, 4)`` sanitised xyxy pixel boxes.
            image_size: ``(H, W)`` of the model input.
            hard: binary instead of soft masks.
            mask_transform: applied to each level's ``(B, N, h, w)`` masks before pooling.
            segmentations: ``(B, N, H, W)`` full-resolution region masks
                (:func:`~fineregion_pl.model.region_masks.rasterize_segmentations`), all zero for regions
                without one: where present they replace the box mask (area-downsampled per level).

        Returns:
            ``z (B, N, D)`` (levels concatenated) and the per-level masks pooled with.
        """
        exact = integrals_exact(self.pooling, hard, mask_transform, segmentations)
        z = box_pool(features, boxes, image_size) if exact else None  # None: the kernel declines (see box_pool)
        if z is None and use_integrals(features, boxes, exact):
            z = pool_boxes(features, boxes, image_size)
        if z is not None:  # masks are built only if read
            return z, LazyBoxMasks(boxes, image_size, features)
        masks = [box_masks(boxes, image_size, f.shape[1:3], hard=hard).to(f.dtype) for f in features]
        if segmentations is not None:
            masks = [merge_masks(level_segmentation(segmentations, m.shape[-2:], hard, m.dtype), m) for m in masks]
        if mask_transform is not None:
            masks = [mask_transform(m) for m in masks]
        if self.pooling == "roi_align":
            return roi_align_pool(features, boxes, image_size), masks
        if self.pooling == "roi_align_7x7":
            return self.roi(features, boxes, image_size), masks
        return pool_levels(features, boxes, image_size, masks), masks

    @staticmethod
    def context(features: list[Tensor]) -> Tensor:
        """Whole-image features ``(B, D)``: the mean over all cells of each level, concatenated."""
        return torch.cat([f.mean(dim=(1, 2)) for f in features], dim=-1)


def level_segmentation(segmentations: Tensor, feature_size: tuple[int, int], hard: bool, dtype: torch.dtype) -> Tensor:
    """Full-resolution region masks on one feature grid (cell coverage; binary at 0.5 when ``hard``)."""
    masks = area_downsample(segmentations, feature_size, dtype)
    return (masks >= 0.5).to(dtype) if hard else masks


def roi_align_pool(features: list[Tensor], boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """RoIAlign of every box to 1x1 on every level (torchvision), concatenated: ``(B, N, D)``."""
    return torch.cat(roi_grid(features, boxes, image_size, 1), dim=-1)


def whole_image_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Replace every non-empty box by the whole input image (padding rows stay zero)."""
    whole = boxes.new_tensor([0.0, 0.0, float(image_size[1]), float(image_size[0])]).expand_as(boxes)
    return torch.where((boxes[..., 2:] > boxes[..., :2]).all(-1, keepdim=True), whole, boxes)
