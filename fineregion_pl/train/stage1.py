"""Stage 1: fine-tune the Swin region encoder with dynamic region masking (paper section 3.2)."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fineregion_pl.model.config import as_config, plain_hparams
from fineregion_pl.model.dynamic_masking import DynamicMasking, MaskingMode
from fineregion_pl.model.encoder import EncoderConfig
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.losses import attention_inside, mask_loss
from fineregion_pl.model.schemas import check_options
from fineregion_pl.model.vision_model import RegionOutputs, RegionVisionModel
from fineregion_pl.train.finite_loss import stop_on_non_finite_loss
from fineregion_pl.train.optim import adamw_with_schedule


class Stage1Module(L.LightningModule):
    """Trains the region encoder, category head and region attention on ``L_cls + w * L_mask``.

    Args:
        encoder: the timm backbone and feature levels.
        num_classes: region categories (5 shapes for the synthetic benchmark, 80 for COCO).
        categories: category names, index = ``category_id`` (for reports).
        masking: ``dynamic`` (the method), ``hard`` (fixed binary masks) or ``none``
            (whole-image pooling: the global-feature baseline).
        dynamic: training-time perturbations of ``dynamic`` masking.
        use_segmentation: pool regions that have a segmentation (COCO polygons/RLE, e.g. RefCOCOg)
            with their segmentation mask instead of their box mask.
        mask_loss_weight: weight ``w`` of ``L_mask``.
        head_hidden: hidden size of the category head.
        attn_dim: query/key size of the region attention map.
        lr: learning rate of the heads.
        encoder_lr: learning rate of the backbone (default: ``lr``).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay to ``max_steps``.
    """

    def __init__(
        self,
        encoder: EncoderConfig = EncoderConfig(),
        num_classes: Optional[int] = 5,
        categories: Optional[list[str]] = None,
        masking: MaskingMode = "dynamic",
        dynamic: DynamicMasking = DynamicMasking(),
        use_segmentation: bool = False,
        mask_loss_weight: float = 1.0,
        head_hidden: int = 256,
        attn_dim: int = 64,
        lr: float = 1e-3,
        encoder_lr: Optional[float] = None,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
    ):
        super().__init__()
        check_options("model", lr=(lr, ">0"), encoder_lr=(encoder_lr, ">=0"), weight_decay=(weight_decay, ">=0"), warmup_steps=(warmup_steps, ">=0"),
                      mask_loss_weight=(mask_loss_weight, ">=0"), head_hidden=(head_hidden, ">=1"), attn_dim=(attn_dim, ">=1"))
        if not num_classes:
            raise BadInputError("Stage1Module needs `num_classes`: give data shards (`--data.data_dirs`) or `--model.num_classes`")
        self.save_hyperparameters()
        plain_hparams(self.hparams)
        self.dynamic = as_config(DynamicMasking, dynamic)
        self.model = RegionVisionModel(as_config(EncoderConfig, encoder), num_classes, head_hidden, attn_dim)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric
            for stage in ("val", "test")
            for name, metric in (
                ("acc", MulticlassAccuracy(num_classes, average="micro", ignore_index=-1)),
                ("macro_f1", MulticlassF1Score(num_classes, average="macro", ignore_index=-1)),
            )
        })

    def forward(self, batch: dict[str, Any]) -> RegionOutputs:
        segmentations = batch.get("segmentations") if self.hparams.use_segmentation else None
        return self.model(batch["images"], batch["boxes"], batch["region_valid"], self.hparams.masking, self.dynamic, segmentations=segmentations)

    def _losses(self, batch: dict[str, Any], out: RegionOutputs) -> dict[str, torch.Tensor]:
        labelled = out.region_valid & (batch["categories"] >= 0)
        cls = F.cross_entropy(out.logits[labelled], batch["categories"][labelled]) if labelled.any() else out.logits.sum() * 0
        l_mask = mask_loss(out.attn_logits, out.target_masks, out.region_valid)
        return {
            "loss": cls + self.hparams.mask_loss_weight * l_mask,
            "cls_loss": cls,
            "mask_loss": l_mask,
            "attn_inside": attention_inside(out.attn_logits, out.target_masks, out.region_valid).detach(),
        }

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The training loss terms of a batch with the current weights (``CheckpointGate`` checks them before a checkpoint)."""
        return self._losses(batch, self(batch))

    def configure_callbacks(self) -> list:
        from fineregion_pl.train.callbacks import CheckpointGate

        return [CheckpointGate()]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        losses = self._losses(batch, out)
        stop_on_non_finite_loss(self, losses)
        labelled = out.region_valid & (batch["categories"] >= 0)
        acc = (out.logits.argmax(-1) == batch["categories"])[labelled].float().mean()
        bs = batch["images"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, batch_size=bs)
        self.log("train/acc", acc, prog_bar=True, batch_size=bs)
        self.log("train/loss_", losses["loss"].detach(), prog_bar=True, batch_size=bs, logger=False)
        return losses["loss"]

    def _eval_step(self, batch: dict[str, Any], stage: str) -> RegionOutputs:
        out = self(batch)
        losses = self._losses(batch, out)
        bs = batch["images"].shape[0]
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, batch_size=bs, sync_dist=True)
        target = torch.where(out.region_valid, batch["categories"], torch.full_like(batch["categories"], -1))
        for name in ("acc", "macro_f1"):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(out.logits.flatten(0, 1), target.flatten())
            self.log(f"{stage}/{name}", metric, batch_size=bs, prog_bar=name == "acc")
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict]:
        if batch is None:  # every image of the batch was skipped (counted by the prediction writer)
            return []
        out = self(batch)
        probs = out.logits.softmax(-1)
        names = self.hparams.categories
        rows = []
        for b, ids in enumerate(batch["region_ids"]):
            for n, rid in enumerate(ids):
                score, cls = probs[b, n].max(-1)
                rows.append({
                    "image_id": batch["image_ids"][b],
                    "region_id": rid,
                    "category_id": int(cls),
                    "category": names[int(cls)] if names else None,
                    "score": float(score),
                })
        return rows

    def configure_optimizers(self) -> dict:
        backbone = list(self.model.encoder.parameters())
        ids = {id(p) for p in backbone}
        heads = [p for p in self.parameters() if id(p) not in ids]
        lr = self.hparams.lr
        groups = [{"params": heads, "lr": lr}, {"params": backbone, "lr": self.hparams.encoder_lr or lr}]
        return adamw_with_schedule(groups, self.hparams.weight_decay, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches)
