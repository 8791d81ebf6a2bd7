"""Stage 2: adaptive region prompts into a LoRA language model (paper sections 3.3-3.5)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import box_geometry, sanitize_boxes
from .checkpoints import load_stage1_weights, read_checkpoint
from .config_utils import as_config, optional_config, plain_hparams
from .errors import BadInputError, check_finite_loss
from .evaluation.grounding import grounding_outcome
from .evaluation.test_results import RegionTestCollector
from .language import LanguageModelConfig, RegionLanguageModel
from .losses import consistency_loss, mask_loss
from .masking import DynamicMasking
from .optim import adamw_with_schedule
from .prompts import PromptMode, RegionPrompt
from .region_model import RegionOutputs, RegionVisionModel
from .vision import EncoderConfig, MaskingMode, whole_image_boxes


class Stage2Module(L.LightningModule):
    """Trains the region prompt and the LM's LoRA adapters on ``w * L_mask + λ1 L_caption + λ2 L_consistency``.

    Args:
        language_model: the Hugging Face LM, its LoRA settings and the instruction template.
        init_from: a stage-1 Lightning checkpoint; its encoder, head and attention weights are
            loaded, and ``encoder``/``num_classes`` default to the ones it was trained with.
        encoder: the backbone (default: from ``init_from``).
        num_classes: region categories (default: from ``init_from``).
        categories: category names, index = ``category_id`` (default: from ``init_from``).
        head_hidden, attn_dim: sizes of the stage-1 head and attention (default: from ``init_from``).
        masking: region pooling: ``dynamic``, ``hard`` or ``none``.
        dynamic: training-time perturbations of ``dynamic`` masking.
        use_segmentation: pool regions with their segmentation mask where the data has one.
        prompt_mode: ``adaptive`` (the method) or ``static`` (the "no adaptive prompts" ablation).
        prompt_tokens: ``k``, soft prompt tokens per region (plus one region token).
        prompt_hidden: hidden size of the adaptive prompt generator.
        freeze_encoder: keep the vision encoder fixed in stage 2.
        caption_weight: ``λ1``.
        consistency_weight: ``λ2``.
        mask_loss_weight: weight of ``L_mask`` carried over from stage 1 (0 switches it off).
        referring_weight: weight of the referring-expression loss (trains what grounding scores).
        spatial_weight: weight of the spatial-question loss (two-region questions, LM answers).
        classification_weight: weight of the stage-1 category loss carried on in stage 2 (0 freezes
            the category head; otherwise it keeps learning with the encoder it reads).
        lr: learning rate of the region prompt.
        lora_lr: learning rate of the LM's trainable weights (default: ``lr``).
        encoder_lr: learning rate of the vision side.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up before cosine decay to ``max_steps``.
        max_new_tokens: caption length limit at generation.
        num_beams: 1 for greedy decoding, more for beam search.
        generation_batch_size: regions per ``generate`` call at evaluation.
        ignore_regions: evaluate with every box replaced by the whole image (the control that
            shows how much the captions depend on region information).
        results_dir: where ``test`` writes ``results.json`` (default: the logger's folder).
    """

    def __init__(
        self,
        language_model: LanguageModelConfig = LanguageModelConfig(),
        init_from: Optional[str] = None,
        encoder: Optional[EncoderConfig] = None,
        num_classes: Optional[int] = None,
        categories: Optional[list[str]] = None,
        head_hidden: Optional[int] = None,
        attn_dim: Optional[int] = None,
        masking: MaskingMode = "dynamic",
        dynamic: DynamicMasking = DynamicMasking(),
        use_segmentation: bool = False,
        prompt_mode: PromptMode = "adaptive",
        prompt_tokens: int = 4,
        prompt_hidden: int = 512,
        freeze_encoder: bool = False,
        caption_weight: float = 1.0,
        consistency_weight: float = 0.0,
        mask_loss_weight: float = 0.0,
        referring_weight: float = 0.0,
        spatial_weight: float = 0.0,
        classification_weight: float = 0.0,
        lr: float = 1e-3,
        lora_lr: Optional[float] = None,
        encoder_lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        max_new_tokens: int = 16,
        num_beams: int = 1,
        generation_batch_size: int = 256,
        ignore_regions: bool = False,
        results_dir: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        stage1 = read_checkpoint(init_from) if init_from else None
        stage1_hparams = (stage1 or {}).get("hyper_parameters", {})
        encoder = optional_config(EncoderConfig, encoder) or optional_config(EncoderConfig, stage1_hparams.get("encoder"))
        if encoder is None:
            raise BadInputError("Stage2Module needs `encoder` or `init_from` (a stage-1 checkpoint to take the encoder from)")
        num_classes = num_classes or stage1_hparams.get("num_classes")
        if not num_classes:
            raise BadInputError("Stage2Module needs `num_classes` or `init_from` (a stage-1 checkpoint to take it from)")
        head_hidden = head_hidden or stage1_hparams.get("head_hidden", 256)
        attn_dim = attn_dim or stage1_hparams.get("attn_dim", 64)
        self.hparams.update(
            encoder=encoder, num_classes=num_classes, categories=categories or stage1_hparams.get("categories"), head_hidden=head_hidden, attn_dim=attn_dim
        )
        plain_hparams(self.hparams)
        self.dynamic = as_config(DynamicMasking, dynamic)
        self.vision = RegionVisionModel(encoder, num_classes, head_hidden, attn_dim)
        if stage1 is not None:
            load_stage1_weights(self.vision, stage1, init_from)
        # stage 2 trains the category head only with classification_weight > 0 and the attention map
        # only with L_mask; frozen, they are also no "unused parameters" for DDP
        self.vision.head.requires_grad_(classification_weight > 0)
        self.vision.attention.requires_grad_(mask_loss_weight > 0)
        if freeze_encoder:
            self.vision.encoder.requires_grad_(False)
        self.collector = RegionTestCollector()

    # The language model and the prompt (whose size follows the LM) are built in configure_model,
    # which Lightning calls inside the strategy's init context: under DeepSpeed ZeRO-3 the LM is
    # sharded as it is built. Outside a Trainer, call configure_model() before listing parameters;
    # the first use of `language` or `prompt` also builds them.
    def configure_model(self) -> None:
        if "language" in self._modules:
            return
        language = RegionLanguageModel(as_config(LanguageModelConfig, self.hparams.language_model))
        hp = self.hparams
        prompt = RegionPrompt(self.vision.out_dim, language.hidden_size, hp.prompt_tokens, hp.prompt_mode, hp.prompt_hidden, language.embedding_rms())
        # not add_module: it probes hasattr(), which would call the properties below
        self._modules["language"] = language
        self._modules["prompt"] = prompt

    @property
    def language(self) -> RegionLanguageModel:
        """The LoRA language model (built on first use; see :meth:`configure_model`)."""
        self.configure_model()
        return self._modules["language"]

    @property
    def prompt(self) -> RegionPrompt:
        """The region prompt (built with the language model)."""
        self.configure_model()
        return self._modules["prompt"]

    # ------------------------------------------------------------------ forward pieces
    def encode(self, batch: dict[str, Any]) -> tuple[RegionOutputs, Tensor, Tensor]:
        """Vision forward and region prompts for every valid region of the batch.

        Returns the vision outputs, the ``(R, 2)`` ``(image, slot)`` index of each valid region and
        its ``(R, k + 1, d)`` prompt.
        """
        boxes, region_valid = batch["boxes"], batch["region_valid"]
        masking = self.hparams.masking
        if self.hparams.ignore_regions:
            # the control: features and prompts (pair tokens too) see the whole image for every
            # region; predicted boxes and grounding IoU use the real boxes (``reported_boxes``)
            boxes, region_valid = self.reported_boxes(batch)
            boxes, masking = whole_image_boxes(boxes, tuple(batch["images"].shape[-2:])), "none"
        segmentations = batch.get("segmentations") if self.hparams.use_segmentation and not self.hparams.ignore_regions else None
        out = self.vision(batch["images"], boxes, region_valid, masking, self.dynamic, segmentations=segmentations)
        index = out.region_valid.nonzero()
        b, n = index[:, 0], index[:, 1]
        prompts = self.prompt(out.regions.z[b, n], out.regions.context[b], region_geometry(batch, out, index))
        return out, index, prompts

    @staticmethod
    def reported_boxes(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The batch's boxes as the model input's sanitised ``(boxes, region_valid)``: what predictions
        and grounding report, also in the no-region control, where the model saw other boxes."""
        height, width = batch["images"].shape[-2:]
        return sanitize_boxes(batch["boxes"], batch["region_valid"], width, height)

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """All stage-2 losses of a batch (each logged; ``loss`` is the weighted sum)."""
        out, index, prompts = self.encode(batch)
        if index.shape[0] == 0:  # no usable region in the whole batch: nothing to learn, keep the graph
            zero = prompts.sum() * 0.0
            return {"loss": zero, "caption_loss": zero, "consistency_loss": zero}
        texts = [batch["captions"][b][n] for b, n in index.tolist()]
        caption, rep = self.language.text_loss(prompts, texts, "caption")
        reps = rep.new_zeros(*out.region_valid.shape, rep.shape[-1])
        reps[index[:, 0], index[:, 1]] = rep
        consistency = consistency_loss(reps, out.boxes, out.region_valid)
        total = self.hparams.caption_weight * caption + self.hparams.consistency_weight * consistency
        result = {"caption_loss": caption, "consistency_loss": consistency}
        if self.hparams.mask_loss_weight > 0:
            result["mask_loss"] = mask_loss(out.attn_logits, out.target_masks, out.region_valid)
            total = total + self.hparams.mask_loss_weight * result["mask_loss"]
        if self.hparams.referring_weight > 0:
            rows, expressions = referring_targets(batch, index, self.training)
            if rows:
                result["referring_loss"], _ = self.language.text_loss(prompts[rows], expressions, "referring")
                total = total + self.hparams.referring_weight * result["referring_loss"]
        if self.hparams.spatial_weight > 0:
            first, second, questions = spatial_pairs(batch, index)
            if first:
                answers = [q["answer"] for q in questions]
                result["spatial_loss"], _ = self.language.text_loss(self.question_prompts(batch, out, index, prompts, first, second), answers, "question")
                total = total + self.hparams.spatial_weight * result["spatial_loss"]
        labelled = out.region_valid & (batch["categories"] >= 0)
        if labelled.any():
            result["acc"] = (out.logits.argmax(-1) == batch["categories"])[labelled].float().mean()
            if self.hparams.classification_weight > 0:
                result["cls_loss"] = F.cross_entropy(out.logits[labelled], batch["categories"][labelled])
                total = total + self.hparams.classification_weight * result["cls_loss"]
        result["loss"] = total
        return result

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        tokens_before = self.language.text_tokens
        losses = self.losses(batch)
        self.last_batch_tokens = self.language.text_tokens - tokens_before  # supervised text tokens (RegionThroughputMonitor)
        check_finite_loss(losses["loss"], self.global_step, losses)
        bs = batch["images"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/caption", losses["caption_loss"].detach(), prog_bar=True, batch_size=bs, logger=False)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=batch["images"].shape[0], sync_dist=True, prog_bar=False)

    @torch.no_grad()
    def describe(self, batch: dict[str, Any], encoded: Optional[tuple[RegionOutputs, Tensor, Tensor]] = None) -> list[dict]:
        """Captions and categories for every valid region of a batch, aligned to region ids.

        ``encoded`` is :meth:`encode`'s result when the caller has it already.
        """
        out, index, prompts = encoded or self.encode(batch)
        captions: list[str] = []
        step = self.hparams.generation_batch_size
        for start in range(0, prompts.shape[0], step):
            captions += self.language.generate(prompts[start : start + step], self.hparams.max_new_tokens, self.hparams.num_beams)
        probs = out.logits.float().softmax(-1)
        boxes = self.reported_boxes(batch)[0]
        names = self.hparams.categories
        rows = []
        for (b, n), caption in zip(index.tolist(), captions):
            score, cls = probs[b, n].max(-1)
            scale = float(batch["scales"][b])
            rows.append({
                "image_id": batch["image_ids"][b],
                "region_id": batch["region_ids"][b][n],
                "box": [round(float(v) / scale, 2) for v in boxes[b, n]],
                "caption": caption,
                "category_id": int(cls),
                "category": names[int(cls)] if names else None,
                "score": round(float(score), 4),
            })
        return rows

    @torch.no_grad()
    def ground(self, batch: dict[str, Any], out: RegionOutputs, index: Tensor, prompts: Tensor) -> list[tuple[float, float]]:
        """Grounding outcomes of every referring expression in the batch (candidates: its image's regions)."""
        rows, expressions = referring_targets(batch, index, training=False)
        outcomes = []
        image_of = index[:, 0]
        real = self.reported_boxes(batch)[0]
        for row, expression in zip(rows, expressions):
            candidates = (image_of == image_of[row]).nonzero().flatten()
            scores = self.language.log_likelihood(prompts[candidates], [expression] * len(candidates), "referring")
            b, n = index[row].tolist()
            boxes = real[image_of[candidates], index[candidates, 1]]
            outcomes.append(grounding_outcome(scores, boxes, real[b, n]))
        return outcomes

    @torch.no_grad()
    def answer(self, batch: dict[str, Any], out: RegionOutputs, index: Tensor, prompts: Tensor) -> list[tuple[str, str]]:
        """``(predicted, true)`` answers of the batch's spatial questions, generated by the LM."""
        first, second, questions = spatial_pairs(batch, index)
        if not first:
            return []
        predicted = self.language.generate(self.question_prompts(batch, out, index, prompts, first, second), max_new_tokens=4, task="question")
        return list(zip(predicted, [q["answer"] for q in questions]))

    def question_prompts(self, batch: dict[str, Any], out: RegionOutputs, index: Tensor, prompts: Tensor, first: list[int], second: list[int]) -> list[Tensor]:
        """The two slots of the question template: the first region's prompt, and the second's
        followed by the pair token of the two boxes (adaptive prompts)."""
        geometry = region_geometry(batch, out, index)
        pair = self.prompt.pair_token(geometry[first], geometry[second])
        later = prompts[second] if pair is None else torch.cat([prompts[second], pair], dim=1)
        return [prompts[first], later]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, index, prompts = encoded = self.encode(batch)
        rows = self.describe(batch, encoded)
        self.collector.add(batch, rows, grounding=self.ground(batch, out, index, prompts), spatial=self.answer(batch, out, index, prompts))

    def on_test_epoch_start(self) -> None:
        self.collector.reset()

    def on_test_epoch_end(self) -> None:
        results = self.collector.compute(self, self.hparams.categories or [], self.hparams.num_classes)
        if results is None:  # not rank 0
            return
        for section in ("classification", "caption", "grounding", "spatial"):
            for name, value in results.get(section, {}).items():
                if isinstance(value, float):
                    self.log(f"test/{section}/{name}", value, rank_zero_only=True)
        out_dir = Path(self.hparams.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        self.collector.write(results, out_dir)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict]:
        return self.describe(batch)

    # ------------------------------------------------------------------ optimisation and checkpoints
    def configure_optimizers(self) -> dict:
        lr = self.hparams.lr
        groups = [
            {"params": list(self.prompt.parameters()), "lr": lr},
            {"params": list(self.language.parameters()), "lr": self.hparams.lora_lr or lr},
            {"params": list(self.vision.parameters()), "lr": self.hparams.encoder_lr},
        ]
        return adamw_with_schedule(groups, self.hparams.weight_decay, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches)

    def frozen_lm_keys(self) -> set[str]:
        """State-dict keys of frozen language-model weights (the base LM under LoRA)."""
        # remove_duplicate=False: a tied lm_head shares the embedding but has a state-dict key of its own
        return {f"language.{name}" for name, p in self.language.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_lm_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["frozen_lm_from"] = self.hparams.language_model["name_or_path"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits, then fill in the frozen LM weights (loaded from the base LM)."""
        own = self.state_dict()
        frozen = self.frozen_lm_keys()
        missing = sorted(set(own) - frozen - set(checkpoint["state_dict"]))
        unexpected = sorted(set(checkpoint["state_dict"]) - set(own))
        if missing or unexpected:
            raise BadInputError(
                f"checkpoint does not fit this Stage2Module: missing {len(missing)} key(s) {missing[:5]}, "
                f"unexpected {len(unexpected)} key(s) {unexpected[:5]} (a stage-1 checkpoint goes to `init_from`, not `ckpt_path`)"
            )
        for key in frozen - set(checkpoint["state_dict"]):
            checkpoint["state_dict"][key] = own[key]


def region_geometry(batch: dict[str, Any], out: RegionOutputs, index: Tensor) -> Tensor:
    """Box geometry (:func:`~fineregion_pl.boxes.box_geometry`) of the regions at ``index``: ``(R, 7)``."""
    height, width = batch["images"].shape[-2:]
    size = torch.tensor([float(width), float(height)], device=out.boxes.device).expand(out.boxes.shape[0], 2)
    return box_geometry(out.boxes, size[:, 0], size[:, 1])[index[:, 0], index[:, 1]]


def referring_targets(batch: dict[str, Any], index: Tensor, training: bool) -> tuple[list[int], list[str]]:
    """Rows of ``index`` whose region has a referring expression, and that expression
    (a random one when training, the first otherwise)."""
    rows, expressions = [], []
    for row, (b, n) in enumerate(index.tolist()):
        options = batch["referring"][b][n]
        if options:
            rows.append(row)
            expressions.append(random.choice(options) if training else options[0])
    return rows, expressions


def spatial_pairs(batch: dict[str, Any], index: Tensor) -> tuple[list[int], list[int], list[dict]]:
    """For each spatial question whose two regions are in the batch: the rows of ``index`` of its
    first and second region, and the question."""
    row_of = {(b, n): row for row, (b, n) in enumerate(index.tolist())}
    first, second, kept = [], [], []
    for b, questions in enumerate(batch["questions"]):
        slot = {rid: n for n, rid in enumerate(batch["region_ids"][b])}
        for q in questions:
            a, c = (row_of.get((b, slot.get(rid, -1))) for rid in q["regions"][:2])
            if a is not None and c is not None:
                first.append(a)
                second.append(c)
                kept.append(q)
    return first, second, kept
