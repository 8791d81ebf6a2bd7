"""The region captioner: vision encoder + region pooling + region prompt + LoRA language model, one ``nn.Module``.

:class:`RegionCaptioner` is what inference, export, the Python API, the demo and the server use,
and what :class:`~fineregion_pl.train.stage2.Stage2Module` trains. It knows nothing of
Lightning. Its small API:

- :meth:`RegionCaptioner.encode`: a batch to region features and prompts (:class:`EncodedBatch`);
- :meth:`RegionCaptioner.losses`: the unweighted stage-2 loss terms of a batch (the training
  module weights them);
- :meth:`RegionCaptioner.generate` / :meth:`RegionCaptioner.score`: text for prompts, and the
  log-likelihood of texts given prompts;
- :meth:`RegionCaptioner.describe` / :meth:`RegionCaptioner.describe_many`: captions, categories
  and scores for boxes on PIL images; :meth:`RegionCaptioner.describe_batch` for a collated batch;
- :meth:`RegionCaptioner.save_pretrained` / :meth:`RegionCaptioner.from_pretrained`: the export
  folder (its native format), and :meth:`RegionCaptioner.from_checkpoint` for a stage-2
  Lightning checkpoint file (read with ``torch.load(weights_only=True)``, no Lightning needed).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fineregion_pl.model.boxes import box_geometry, box_list, check_box, sanitize_boxes
from fineregion_pl.model.checkpoint_files import check_weights_fit, read_checkpoint
from fineregion_pl.model.config import as_config
from fineregion_pl.model.dynamic_masking import DynamicMasking, MaskingMode
from fineregion_pl.model.encoder import EncoderConfig, whole_image_boxes
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.fingerprint import check_fingerprint
from fineregion_pl.model.images import as_rgb
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings, RegionLanguageModel, vision_question_task
from fineregion_pl.model.losses import consistency_loss, mask_loss, view_consistency_loss
from fineregion_pl.model.region_prompt import PromptMode, RegionPrompt
from fineregion_pl.model.vision_model import RegionOutputs, RegionVisionModel

EXPORT_CONFIG = "fineregion.json"
VISION_WEIGHTS = "vision.safetensors"
CHECKPOINT_PREFIX = "model."  # where Stage2Module keeps its RegionCaptioner in a Lightning checkpoint
_OLD_TOP_LEVEL = ("vision.", "prompt.", "language.")  # checkpoints written before the model library existed


@dataclass
class CaptionerConfig:
    """Everything that defines a :class:`RegionCaptioner` (its weights aside).

    Attributes:
        encoder: the timm backbone and its feature levels.
        num_classes: region categories of the category head.
        categories: category names, index = ``category_id``.
        head_hidden, attn_dim: sizes of the category head and of the region attention map.
        masking: region pooling: ``dynamic``, ``hard`` or ``none``.
        dynamic: training-time perturbations of ``dynamic`` masking.
        use_segmentation: pool regions with their segmentation mask where the batch has one.
        prompt_mode: ``adaptive`` (the method), ``static`` or ``static_geometry``.
        prompt_tokens: ``k``, soft prompt tokens per region (plus one region token).
        prompt_hidden: hidden size of the adaptive prompt generator.
        language_model: the Hugging Face LM, its LoRA settings and the task templates.
        max_new_tokens: caption length limit at generation.
        num_beams: 1 for greedy decoding, more for beam search.
        generation_batch_size: regions per ``generate`` call.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    num_classes: int = 5
    categories: Optional[list[str]] = None
    head_hidden: int = 256
    attn_dim: int = 64
    masking: MaskingMode = "dynamic"
    dynamic: DynamicMasking = field(default_factory=DynamicMasking)
    use_segmentation: bool = False
    prompt_mode: PromptMode = "adaptive"
    prompt_tokens: int = 4
    prompt_hidden: int = 512
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    max_new_tokens: int = 16
    num_beams: int = 1
    generation_batch_size: int = 256

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionerConfig:
        """The config from a dict that may hold more keys (a training module's hyper-parameters)."""
        known = {f.name for f in fields(cls)}
        return as_config(cls, {k: v for k, v in values.items() if k in known and v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return asdict(self)


@dataclass
class EncodedBatch:
    """What :meth:`RegionCaptioner.encode` gives for a batch.

    Attributes:
        vision: the vision outputs (pooled features, logits, attention, sanitised boxes).
        index: ``(R, 2)`` ``(image, slot)`` of every valid region, in row-major order.
        prompts: ``(R, k + 1, d)`` each region's soft prompt.
        geometry: ``(R, 7)`` each region's box geometry (:func:`~fineregion_pl.model.boxes.box_geometry`).
    """

    vision: RegionOutputs
    index: Tensor
    prompts: Tensor
    geometry: Tensor


class RegionCaptioner(nn.Module):
    """A region-level vision-language model: describes, scores and answers about regions of images.

    The language model and the prompt (whose width follows the LM) are built by
    :meth:`build_language`, on first use of :attr:`language` or :attr:`prompt` at the latest: a
    training strategy can build them inside its sharded-init context (DeepSpeed ZeRO-3).

    Args:
        config: a :class:`CaptionerConfig` (or a dict of its fields).
        build_language: build the language model now.
    """

    def __init__(self, config: CaptionerConfig | dict, build_language: bool = True):
        super().__init__()
        self.config = config = as_config(CaptionerConfig, config)
        self.vision = RegionVisionModel(config.encoder, config.num_classes, config.head_hidden, config.attn_dim)
        if build_language:
            self.build_language()

    # ------------------------------------------------------------------ parts
    def build_language(self, precision: Optional[str] = None) -> None:
        """Load the language model (``from_pretrained`` + LoRA) and build the region prompt for it.

        Args:
            precision: the trainer's precision, which ``language_model.dtype: auto`` follows
                (``None``: float32, the exact reference on a CPU).
        """
        if "language" in self._modules:
            return
        cfg = self.config
        language = RegionLanguageModel(cfg.language_model, precision)
        prompt = RegionPrompt(self.vision.out_dim, language.hidden_size, cfg.prompt_tokens, cfg.prompt_mode, cfg.prompt_hidden, language.embedding_rms())
        # not add_module: it probes hasattr(), which would call the properties below
        self._modules["language"] = language
        self._modules["prompt"] = prompt

    @property
    def language(self) -> RegionLanguageModel:
        """The LoRA language model (built on first use)."""
        self.build_language()
        return self._modules["language"]

    @property
    def prompt(self) -> RegionPrompt:
        """The region prompt (built with the language model)."""
        self.build_language()
        return self._modules["prompt"]

    @property
    def image_size(self) -> int:
        """Side of the square model input."""
        return self.vision.encoder.input_size

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    # ------------------------------------------------------------------ forward pieces
    def encode(self, batch: dict[str, Any], ignore_regions: bool = False) -> EncodedBatch:
        """Vision forward and region prompts for every valid region of a collated batch.

        Args:
            batch: :func:`~fineregion_pl.model.transforms.collate_regions` output; its regions'
                ``segmentations`` are pooled when ``batch["pool_segmentations"]`` is true (default:
                the config's ``use_segmentation``).
            ignore_regions: the no-region control: features and prompts (pair tokens too) see the
                whole image for every region; reported boxes stay the real ones
                (:meth:`reported_boxes`).
        """
        boxes, region_valid = batch["boxes"], batch["region_valid"]
        masking = self.config.masking
        if ignore_regions:
            boxes, region_valid = self.reported_boxes(batch)
            boxes, masking = whole_image_boxes(boxes, tuple(batch["images"].shape[-2:])), "none"
        # a user's masks at inference (describe_many, predict's boxes files) are pooled whatever the training config said
        pool_masks = batch.get("pool_segmentations", self.config.use_segmentation)
        segmentations = batch.get("segmentations") if pool_masks and not ignore_regions else None
        out = self.vision(batch["images"], boxes, region_valid, masking, self.config.dynamic, segmentations=segmentations)
        index = out.region_valid.nonzero()
        b, n = index[:, 0], index[:, 1]
        geometry = region_geometry(batch, out, index)
        prompts = self.prompt(out.regions.z[b, n], out.regions.context[b], geometry)
        return EncodedBatch(vision=out, index=index, prompts=prompts, geometry=geometry)

    @staticmethod
    def reported_boxes(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The batch's boxes as the model input's sanitised ``(boxes, region_valid)``: what
        predictions and grounding report, also in the no-region control, where the model saw other boxes."""
        height, width = batch["images"].shape[-2:]
        return sanitize_boxes(batch["boxes"], batch["region_valid"], width, height)

    def question_prompts(self, encoded: EncodedBatch, first: list[int], second: list[int]) -> list[Tensor]:
        """The two slots of the question template: the first region's prompt, and the second's
        followed by the pair token of the two boxes (adaptive prompts)."""
        pair = self.prompt.pair_token(encoded.geometry[first], encoded.geometry[second])
        later = encoded.prompts[second] if pair is None else torch.cat([encoded.prompts[second], pair], dim=1)
        return [encoded.prompts[first], later]

    def losses(
        self,
        batch: dict[str, Any],
        encoded: Optional[EncodedBatch] = None,
        *,
        mask: bool = False,
        referring: bool = False,
        spatial: bool = False,
        vision_questions: bool = False,
        classification: bool = False,
        consistency_pairing: str = "paper",
    ) -> dict[str, Tensor]:
        """The unweighted stage-2 loss terms of a batch (the caller weights and sums them).

        ``consistency_pairing`` picks what ``consistency_loss`` pulls together: ``paper`` (every
        intersecting pair, eq. 9), ``iou`` (pairs weighted by their IoU) or ``views`` (each region
        with itself pooled under a second, independent dynamic perturbation: one more vision and
        LM forward).

        Always ``caption_loss`` (eq. 8) and ``consistency_loss`` (eq. 9); ``mask_loss`` (``L_mask``),
        ``referring_loss``, ``spatial_loss``, ``vision_question_loss`` (one-anchor questions: each
        relation's per-token mean, weighted by its number of questions) and ``cls_loss`` when asked for and the batch has
        something to compute them on; ``acc`` (category head accuracy, not differentiated) when
        the batch has labelled regions. Referring expressions are drawn at random in training mode.
        """
        encoded = encoded or self.encode(batch)
        out, index, prompts = encoded.vision, encoded.index, encoded.prompts
        if index.shape[0] == 0:  # no usable region in the whole batch: nothing to learn, keep the graph
            zero = prompts.sum() * 0.0
            return {"caption_loss": zero, "consistency_loss": zero}
        texts = [batch["captions"][b][n] for b, n in index.tolist()]
        calls = {"caption_loss": (prompts, texts, "caption")}
        if referring:
            rows, expressions = referring_targets(batch, index, self.training)
            if rows:
                calls["referring_loss"] = (prompts[rows], expressions, "referring")
        if spatial:
            first, second, questions = spatial_pairs(batch, index)
            if first:
                calls["spatial_loss"] = (self.question_prompts(encoded, first, second), [q["answer"] for q in questions], "question")
        if vision_questions:
            for relation, (rows, questions) in vision_question_groups(batch, index, self.config.language_model.relations).items():
                calls[f"vision_question_loss:{relation}"] = (prompts[rows], [q["answer"] for q in questions], vision_question_task(relation))
        terms = dict(zip(calls, self.language.text_losses(list(calls.values()))))  # one packed LM forward
        vision_terms = [(name, value) for name, value in terms.items() if name.startswith("vision_question_loss:")]
        if vision_terms:  # one term: each relation's mean weighted by its number of questions
            counts = [len(calls[name][1]) for name, _ in vision_terms]
            loss = sum(n * value[0] for n, (_, value) in zip(counts, vision_terms)) / sum(counts)
            terms = {k: v for k, v in terms.items() if not k.startswith("vision_question_loss:")}
            terms["vision_question_loss"] = (loss, None)
        caption, rep = terms["caption_loss"]
        reps = rep.new_zeros(*out.region_valid.shape, rep.shape[-1])
        reps[index[:, 0], index[:, 1]] = rep
        if consistency_pairing == "views":
            second = self.encode(batch)
            _, rep_b = self.language.text_loss(second.prompts, [batch["captions"][b][n] for b, n in second.index.tolist()], "caption")
            consistency = view_consistency_loss(rep, rep_b) if second.index.shape == index.shape and bool((second.index == index).all()) else rep.sum() * 0.0
        else:
            consistency = consistency_loss(reps, out.boxes, out.region_valid, consistency_pairing)
        result = {"caption_loss": caption, "consistency_loss": consistency}
        if mask:
            result["mask_loss"] = mask_loss(out.attn_logits, out.target_masks, out.region_valid)
        result.update({name: loss for name, (loss, _) in terms.items() if name != "caption_loss"})
        labelled = out.region_valid & (batch["categories"] >= 0)
        if labelled.any():
            result["acc"] = (out.logits.argmax(-1) == batch["categories"])[labelled].float().mean().detach()
            if classification:
                result["cls_loss"] = F.cross_entropy(out.logits[labelled], batch["categories"][labelled])
        return result

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, prompts: Tensor | list[Tensor], task: str = "caption", max_new_tokens: Optional[int] = None, num_beams: Optional[int] = None) -> list[str]:
        """Texts for prompts (``(R, p, d)``, or one tensor per slot of ``task``'s template), in
        chunks of ``generation_batch_size`` rows; greedy unless ``num_beams > 1``."""
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        num_beams = num_beams or self.config.num_beams
        slots = [prompts] if isinstance(prompts, Tensor) else list(prompts)
        step = self.config.generation_batch_size
        texts: list[str] = []
        for start in range(0, slots[0].shape[0], step):
            chunk = [s[start : start + step] for s in slots]
            texts += self.language.generate(chunk if len(chunk) > 1 else chunk[0], max_new_tokens, num_beams, task=task)
        return texts

    @torch.no_grad()
    def score(self, prompts: Tensor | list[Tensor], texts: list[str], task: str = "referring") -> Tensor:
        """Log-likelihood of each text (EOS included) given its prompt: ``(R,)``."""
        return self.language.log_likelihood(prompts, texts, task)

    @torch.no_grad()
    def score_shared(self, prompts: Tensor, texts: list[str], owners: list[int], task: str = "referring") -> Tensor:
        """``score(prompts[owners], texts, task)`` with each prompt's context computed once for all its texts: ``(len(texts),)``."""
        return self.language.log_likelihood_shared(prompts, texts, owners, task)

    @torch.no_grad()
    def describe_batch(self, batch: dict[str, Any], encoded: Optional[EncodedBatch] = None, ignore_regions: bool = False) -> list[dict]:
        """Captions and categories for every valid region of a collated batch, aligned to region ids.

        One row per region: ``image_id``, ``region_id``, ``box`` (original-image pixels),
        ``caption``, ``category_id``, ``category``, ``score`` (the category head's probability).
        """
        encoded = encoded or self.encode(batch, ignore_regions)
        captions = self.generate(encoded.prompts)
        probs = encoded.vision.logits.float().softmax(-1)
        boxes = self.reported_boxes(batch)[0]
        names = self.config.categories
        rows = []
        for (b, n), caption in zip(encoded.index.tolist(), captions):
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
    def describe_many(
        self,
        images: Sequence[Any],
        boxes: Sequence[Sequence[Sequence[float]]],
        ids: Optional[Sequence[Sequence[Any]]] = None,
        masks: Optional[Sequence[Sequence[Any]]] = None,
    ) -> list[list[dict]]:
        """Captions for the boxes of several PIL images, all regions in one batch.

        Args:
            images: PIL images, numpy arrays (``(H, W[, 3|4])``) or tensors (``(3, H, W)``), paths
                or bytes, all read by :func:`fineregion_pl.model.images.as_rgb` (EXIF orientation,
                16-bit, palette, alpha, CMYK handled as at every front door).
            boxes: per image, its boxes ``[x0, y0, x1, y1]`` in that image's (upright) pixels, as
                lists or an ``(n, 4)`` array/tensor.
            ids: per image, its region ids (default 0, 1, ...).
            masks: per image, per region a COCO segmentation (RLE of the image's size, or polygons
                in its pixels) or None; a region with a mask is pooled over the mask, not its box.

        Returns:
            Per image, one dict per region: ``region_id``, ``box``, ``caption``, ``category``,
            ``category_id``, ``score``.
        """
        from fineregion_pl.model.detections import check_segmentation
        from fineregion_pl.model.transforms import collate_regions, to_region_sample

        if not isinstance(images, (list, tuple)):
            raise BadInputError(f"images must be a list of images (describe() takes one), not {type(images).__name__}")
        images = [as_rgb(image, f"image {index}") for index, image in enumerate(images)]
        boxes = [box_list(b, f"image {index}") for index, b in enumerate(box_list(boxes, "boxes"))]
        if ids is not None:
            ids = [box_list(i, f"image {index} ids") for index, i in enumerate(box_list(ids, "ids"))]
        if len(images) != len(boxes) or (ids is not None and len(ids) != len(images)):
            raise BadInputError(f"got {len(images)} images but {len(boxes)} box lists" + (f" and {len(ids)} id lists" if ids is not None else ""))
        if masks is not None and len(masks) != len(images):
            raise BadInputError(f"got {len(images)} images but {len(masks)} mask lists")
        was_training = self.training
        self.eval()
        samples = []
        for index, (image, image_boxes) in enumerate(zip(images, boxes)):
            region_ids = list(ids[index]) if ids is not None else list(range(len(image_boxes)))
            if len(region_ids) != len(image_boxes):
                raise BadInputError(f"image {index} has {len(image_boxes)} boxes but {len(region_ids)} ids")
            image_masks = list(masks[index]) if masks is not None else [None] * len(image_boxes)
            if len(image_masks) != len(image_boxes):
                raise BadInputError(f"image {index} has {len(image_boxes)} boxes but {len(image_masks)} masks")
            checked = [check_box(b, f"image {index} region {rid}") for b, rid in zip(image_boxes, region_ids)]
            regions = [{"id": rid, "box": b, "segmentation": check_segmentation(m, image.width, image.height, f"image {index} region {rid}")}
                       for rid, b, m in zip(region_ids, checked, image_masks)]
            record = {"image_id": index, "width": image.width, "height": image.height, "regions": regions}
            samples.append(to_region_sample(image, record, self.image_size, max_regions=len(checked) or 1, train=False))
        batch = collate_regions(samples)
        batch["pool_segmentations"] = masks is not None
        device = self.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        try:
            rows = self.describe_batch(batch)
        finally:
            self.train(was_training)
        out: list[list[dict]] = [[] for _ in images]
        for row in rows:
            out[row.pop("image_id")].append(row)
        return out

    def describe(self, image: Any, boxes: Sequence[Sequence[float]], ids: Optional[Sequence[Any]] = None, masks: Optional[Sequence[Any]] = None) -> list[dict]:
        """Captions for the boxes of one PIL image (see :meth:`describe_many`)."""
        return self.describe_many([image], [boxes], None if ids is None else [ids], None if masks is None else [masks])[0]

    def describe_detections(self, image: Any, detections: Sequence[dict], score_threshold: float = 0.0, top_k: Optional[int] = None) -> list[dict]:
        """Captions for a detector's output on one PIL image, in the COCO results format.

        ``detections`` are ``{"bbox": [x, y, w, h], "score", "category_id"}`` objects (a
        ``segmentation`` each, optional: the region is then pooled over the mask); those scoring
        at least ``score_threshold`` are described, at most ``top_k``, best first. Each row is a
        :meth:`describe` row (``region_id`` = the detection's index in ``detections``) with the
        detector's ``detector_score`` and ``detector_category_id``.
        """
        from fineregion_pl.model.detections import regions_from_detections

        regions = regions_from_detections(detections, "detections", image.width, image.height, score_threshold, top_k)
        if not regions:
            return []
        masks = [r["segmentation"] for r in regions]
        rows = self.describe(image, [r["box"] for r in regions], [r["id"] for r in regions], masks if any(m is not None for m in masks) else None)
        by_id = {r["id"]: r for r in regions}  # a box wholly outside the image gives no row
        for row in rows:
            region = by_id[row["region_id"]]
            row["detector_score"], row["detector_category_id"] = region["detector_score"], region["detector_category_id"]
        return rows

    # ------------------------------------------------------------------ weights
    def frozen_language_keys(self) -> set[str]:
        """State-dict keys (of this module) of frozen language-model weights: the base LM under LoRA."""
        # remove_duplicate=False: a tied lm_head shares the embedding but has a state-dict key of its own
        return {f"language.{name}" for name, p in self.language.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def load_trained_weights(self, state: dict[str, Tensor], source: str) -> None:
        """Load weights saved without the frozen base LM (as stage-2 checkpoints are); the frozen
        weights stay as loaded from the base model. Anything else missing or unexpected is an error."""
        own = self.state_dict()
        frozen = self.frozen_language_keys()
        check_weights_fit(own, state, source, type(self).__name__, may_miss=frozen)
        self.load_state_dict({**{k: own[k] for k in frozen - set(state)}, **state})

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", dtype: Optional[str] = None, allow_other_base_lm: bool = False) -> RegionCaptioner:
        """A stage-2 Lightning checkpoint file (its base LM must be reachable at the saved path or hub name).

        Args:
            path: the ``.ckpt`` file.
            device: where to run.
            dtype: load the base LM in this dtype instead of the checkpoint's ``language_model.dtype``
                (whose ``auto`` is float32 here, outside a trainer).
            allow_other_base_lm: load even when the base LM found at the saved path is not the one
                the checkpoint records (its fingerprint differs); default: a one-line error.
        """
        checkpoint = read_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters") or {}
        if "language_model" not in hparams:
            raise BadInputError(f"{path} is not a stage-2 checkpoint (no language_model in its hyper-parameters)")
        config = CaptionerConfig.from_dict(hparams)
        if dtype is not None:
            config.language_model.dtype = dtype
        captioner = cls(config)
        if captioner.frozen_language_keys():
            note = check_fingerprint(checkpoint.get("frozen_lm_fingerprint"), config.language_model.name_or_path,
                                     captioner.language.model, str(path), allow_other_base_lm)
            if note:
                warnings.warn(note, stacklevel=2)
        captioner.load_trained_weights(captioner_weights(checkpoint["state_dict"]), str(path))
        return captioner.eval().to(device)

    def save_pretrained(self, folder: str | Path, merge: bool = True, dtype: str = "float32", **extra: Any) -> Path:
        """Write the export folder, this model's native format.

        Layout: ``adapter/`` (the LoRA adapter, ``PeftModel.from_pretrained(base, adapter/)``),
        ``merged/`` (the base LM with the adapter merged in and its tokenizer, plain
        ``AutoModelFor*.from_pretrained``), ``vision.safetensors`` (``vision.*`` and ``prompt.*``)
        and ``fineregion.json`` (the :class:`CaptionerConfig`, the saved dtype, the measured
        ``max_logit_difference`` between this model and the merged one, plus ``extra``). With
        full fine-tuning there is no ``adapter/`` and ``merged/`` is the fine-tuned LM.

        The adapter is merged into the base weights in float32 (merging into bfloat16 weights
        rounds every merged weight and changes captions); ``dtype`` is only what ``merged/`` is
        saved in.
        """
        from peft import PeftModel
        from safetensors.torch import save_file

        from fineregion_pl.model.precision import named_dtype

        save_dtype = named_dtype(dtype) or torch.float32
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        language = self.language
        lora = isinstance(language.model, PeftModel)
        merged_dir = out / "merged"
        difference = None
        if lora:
            language.model.save_pretrained(out / "adapter")
            language.tokenizer.save_pretrained(out / "adapter")
            if merge:
                merged = merged_language_model(language, out / "adapter").to(save_dtype)
                difference = max_logit_difference(language, merged)
                merged.save_pretrained(merged_dir)
        else:
            language.model.to(save_dtype).save_pretrained(merged_dir)
        if merge or not lora:
            language.tokenizer.save_pretrained(merged_dir)
        weights = {f"vision.{k}": v.detach().contiguous() for k, v in self.vision.state_dict().items()}
        weights.update({f"prompt.{k}": v.detach().contiguous() for k, v in self.prompt.state_dict().items()})
        save_file(weights, str(out / VISION_WEIGHTS))
        config = {"captioner": self.config.to_dict(), "encoder_decoder": language.encoder_decoder, "lora": lora,
                  "base_model": self.config.language_model.name_or_path, "dtype": str(save_dtype).removeprefix("torch."),
                  "max_logit_difference": difference, **extra}
        (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        return out

    @classmethod
    def from_export(cls, folder: str | Path, device: str = "cpu") -> RegionCaptioner:
        """The same as :meth:`from_pretrained` (the name the README has always used)."""
        return cls.from_pretrained(folder, device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> RegionCaptioner:
        """Load a :meth:`save_pretrained` (``fineregion-pl export``) folder: the merged LM and the vision side."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / EXPORT_CONFIG).is_file():
            raise BadInputError(f"{folder} is not an export folder: no {EXPORT_CONFIG}")
        if not (folder / "merged").is_dir():
            raise BadInputError(f"{folder} has no merged/ model (exported with --merge false): export again with merging")
        saved = json.loads((folder / EXPORT_CONFIG).read_text())
        values = saved.get("captioner") or saved  # exports written before the model library kept the fields at the top level
        config = CaptionerConfig.from_dict(values)
        config.language_model = as_config(LanguageModelConfig, dict(asdict(config.language_model), name_or_path=str(folder / "merged"), lora=asdict(LoraSettings(enabled=False))))
        captioner = cls(config)
        weights = load_file(str(folder / VISION_WEIGHTS))
        captioner.vision.load_state_dict({k[len("vision."):]: v for k, v in weights.items() if k.startswith("vision.")})
        captioner.prompt.load_state_dict({k[len("prompt."):]: v for k, v in weights.items() if k.startswith("prompt.")})
        return captioner.eval().to(device)


def merged_language_model(language: RegionLanguageModel, adapter_dir: Path) -> nn.Module:
    """The base LM, loaded again from its source in float32, with the adapter saved in ``adapter_dir`` merged in (in float32)."""
    import transformers
    from peft import PeftModel

    auto = transformers.AutoModelForSeq2SeqLM if language.encoder_decoder else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(language.config.name_or_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, autocast_adapter_dtype=False).merge_and_unload().eval()


@torch.no_grad()
def max_logit_difference(language: RegionLanguageModel, merged: nn.Module, length: int = 24, rows: int = 4, seed: int = 0) -> float:
    """Largest absolute difference between the logits of the adapted LM and of ``merged`` on random token ids."""
    generator = torch.Generator().manual_seed(seed)
    vocab = language.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, length), generator=generator).to(next(merged.parameters()).device)
    kwargs = {"decoder_input_ids": ids} if language.encoder_decoder else {}
    was_training = language.model.training
    language.model.eval()
    try:
        adapted = language.model(input_ids=ids, **kwargs).logits.float()
    finally:
        language.model.train(was_training)
    return float((adapted - merged(input_ids=ids, **kwargs).logits.float()).abs().max())


def captioner_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A stage-2 checkpoint's ``state_dict`` as :class:`RegionCaptioner` keys (``model.*`` stripped;
    checkpoints from before the model library had ``vision.*``, ``prompt.*``, ``language.*``)."""
    if any(k.startswith(_OLD_TOP_LEVEL) for k in state_dict):
        return dict(state_dict)
    return {k[len(CHECKPOINT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CHECKPOINT_PREFIX)}


def region_geometry(batch: dict[str, Any], out: RegionOutputs, index: Tensor) -> Tensor:
    """Box geometry (:func:`~fineregion_pl.model.boxes.box_geometry`) of the regions at ``index``: ``(R, 7)``."""
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


def question_relation(question: str, relations: Sequence[str]) -> Optional[str]:
    """The relation phrase a one-anchor question asks about: the entry of ``relations`` that
    stands earliest in its text (``"what is left of the red square?"`` -> ``"left of"``), ``None`` if none does."""
    text = f" {question.lower()} "
    found = [(text.find(f" {r} "), r) for r in relations if f" {r} " in text]
    return min(found)[1] if found else None


def vision_question_groups(batch: dict[str, Any], index: Tensor, relations: Sequence[str]) -> dict[str, tuple[list[int], list[dict]]]:
    """The batch's one-anchor questions (``batch["vision_questions"]``) whose anchor is in the batch
    and whose relation is one of ``relations``, grouped by relation: ``{relation: (anchor rows of
    index, questions)}`` (each relation is its own template)."""
    groups: dict[str, tuple[list[int], list[dict]]] = {}
    for (row,), q in _question_rows(batch, index, "vision_questions", 1):
        relation = question_relation(q["question"], relations)
        if relation is not None:
            rows, kept = groups.setdefault(relation, ([], []))
            rows.append(row)
            kept.append(q)
    return groups


def spatial_pairs(batch: dict[str, Any], index: Tensor) -> tuple[list[int], list[int], list[dict]]:
    """For each spatial question whose two regions are in the batch: the rows of ``index`` of its
    first and second region, and the question."""
    first, second, kept = [], [], []
    for (a, c), q in _question_rows(batch, index, "questions", 2):
        first.append(a)
        second.append(c)
        kept.append(q)
    return first, second, kept


def _question_rows(batch: dict[str, Any], index: Tensor, key: str, regions: int):
    """``(rows, question)`` for each question of ``batch[key]`` whose first ``regions`` regions are
    all in the batch: ``rows`` are those regions' rows of ``index``."""
    row_of = {(b, n): row for row, (b, n) in enumerate(index.tolist())}
    for b, questions in enumerate(batch.get(key) or []):
        slot = {rid: n for n, rid in enumerate(batch["region_ids"][b])}
        for q in questions:
            rows = tuple(row_of.get((b, slot.get(rid, -1))) for rid in q["regions"][:regions])
            if None not in rows:
                yield rows, q
