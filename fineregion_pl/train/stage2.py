"""Stage 2: adaptive region prompts into a LoRA language model (paper sections 3.3-3.5)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
from torch import Tensor

from fineregion_pl.evaluation.card import model_fields
from fineregion_pl.evaluation.coco_caption import require_java
from fineregion_pl.evaluation.collector import RegionTestCollector
from fineregion_pl.evaluation.loops import answer_questions, answer_vision_questions, ground_expressions, grounding_keys
from fineregion_pl.evaluation.protocol_collector import ProtocolCollector
from fineregion_pl.evaluation.protocol_loop import protocol_rows
from fineregion_pl.model.captioner import CHECKPOINT_PREFIX, CaptionerConfig, RegionCaptioner, captioner_weights
from fineregion_pl.model.checkpoint_files import check_weights_fit, load_stage1_weights, read_checkpoint
from fineregion_pl.model.config import optional_config, plain_hparams
from fineregion_pl.model.dynamic_masking import DynamicMasking, MaskingMode
from fineregion_pl.model.encoder import EncoderConfig
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.fingerprint import check_fingerprint, lm_fingerprint
from fineregion_pl.model.language_model import LanguageModelConfig
from fineregion_pl.model.losses import CONSISTENCY_PAIRINGS
from fineregion_pl.model.region_prompt import PromptMode
from fineregion_pl.model.schemas import check_options
from fineregion_pl.train.finite_loss import stop_on_non_finite_loss
from fineregion_pl.train.optim import adamw_with_schedule


class Stage2Module(L.LightningModule):
    """Trains a :class:`~fineregion_pl.model.captioner.RegionCaptioner` (``self.model``): the region
    prompt and the LM's LoRA adapters on ``w * L_mask + λ1 L_caption + λ2 L_consistency`` (plus the
    referring, spatial and category terms when their weights are positive).

    The model does the forward passes; this module weights the loss terms, logs, groups the
    optimiser's parameters, collects test results and keeps the frozen base LM out of checkpoints.

    Args:
        language_model: the Hugging Face LM, its LoRA settings and the instruction template.
        init_from: a stage-1 Lightning checkpoint; ``encoder``/``num_classes``/``categories``/sizes
            default to the ones it was trained with, and its encoder, head and attention weights
            are loaded when ``fit`` starts (not when the module is built to test, predict or export).
        encoder: the backbone (default: from ``init_from``).
        num_classes: region categories (default: from ``init_from``).
        categories: category names, index = ``category_id`` (default: from ``init_from``).
        head_hidden, attn_dim: sizes of the stage-1 head and attention (default: from ``init_from``).
        masking: region pooling: ``dynamic``, ``hard`` or ``none``.
        dynamic: training-time perturbations of ``dynamic`` masking.
        use_segmentation: pool regions with their segmentation mask where the data has one.
        prompt_mode: ``adaptive`` (the method), ``static`` (the "no adaptive prompts" ablation) or
            ``static_geometry`` (learned tokens that follow only the box geometry, pair token kept).
        prompt_tokens: ``k``, soft prompt tokens per region (plus one region token).
        prompt_hidden: hidden size of the adaptive prompt generator.
        freeze_encoder: keep the vision encoder fixed in stage 2.
        caption_weight: ``λ1``.
        consistency_weight: ``λ2``.
        consistency_pairing: what ``L_consistency`` pulls together: ``paper`` (every pair of
            intersecting regions, eq. 9), ``iou`` (pairs weighted by IoU) or ``views`` (each region
            with itself under a second dynamic perturbation).
        mask_loss_weight: weight of ``L_mask`` carried over from stage 1 (0 switches it off).
        referring_weight: weight of the referring-expression loss (trains what grounding scores).
        spatial_weight: weight of the spatial-question loss (two-region questions, LM answers).
        vision_question_weight: weight of the one-anchor question loss (``"what is left of the red
            square?"``, answered with what is there: the data's ``vision_questions``; test scores them).
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
        allow_other_base_lm: load a checkpoint whose recorded base-LM fingerprint differs from the
            LM at ``language_model.name_or_path`` (default: that is an error; see ``model/fingerprint.py``).
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
        consistency_pairing: str = "paper",
        mask_loss_weight: float = 0.0,
        referring_weight: float = 0.0,
        spatial_weight: float = 0.0,
        vision_question_weight: float = 0.0,
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
        allow_other_base_lm: bool = False,
    ):
        super().__init__()
        check_options("model", lr=(lr, ">0"), lora_lr=(lora_lr, ">0"), encoder_lr=(encoder_lr, ">=0"), weight_decay=(weight_decay, ">=0"),
                      warmup_steps=(warmup_steps, ">=0"), prompt_tokens=(prompt_tokens, ">=1"), prompt_hidden=(prompt_hidden, ">=1"),
                      max_new_tokens=(max_new_tokens, ">=1"), num_beams=(num_beams, ">=1"), generation_batch_size=(generation_batch_size, ">=1"),
                      **{name: (value, ">=0") for name, value in (("caption_weight", caption_weight), ("consistency_weight", consistency_weight),
                         ("mask_loss_weight", mask_loss_weight), ("referring_weight", referring_weight), ("spatial_weight", spatial_weight),
                         ("vision_question_weight", vision_question_weight), ("classification_weight", classification_weight))})
        if consistency_pairing not in CONSISTENCY_PAIRINGS:
            raise BadInputError(f"model.consistency_pairing must be one of {list(CONSISTENCY_PAIRINGS)}, got {consistency_pairing!r}")
        self.save_hyperparameters()
        self.hparams.update(resolve_from_stage1(self.hparams))
        plain_hparams(self.hparams)
        self.model = RegionCaptioner(CaptionerConfig.from_dict(dict(self.hparams)), build_language=False)
        vision = self.model.vision
        # stage 2 trains the category head only with classification_weight > 0 and the attention map
        # only with L_mask or when it pools (attention pooling); frozen, they are also no "unused parameters" for DDP
        vision.head.requires_grad_(classification_weight > 0)
        vision.attention.requires_grad_(mask_loss_weight > 0 or vision.encoder.pooling == "attention")
        if freeze_encoder:
            vision.encoder.requires_grad_(False)
        self.collector = RegionTestCollector()
        self.protocol_collector = ProtocolCollector()
        self._stage1_loaded = False

    # The language model and the prompt (whose size follows the LM) are built in configure_model,
    # which Lightning calls inside the strategy's init context: under DeepSpeed ZeRO-3 the LM is
    # sharded as it is built. Outside a Trainer, the first use of `model.language` builds them.
    def configure_model(self) -> None:
        try:
            precision = str(self.trainer.precision)  # what `language_model.dtype: auto` follows
        except RuntimeError:  # not attached to a Trainer: float32
            precision = None
        self.model.build_language(precision=precision)

    def setup(self, stage: str) -> None:
        # Lightning calls setup before it restores a checkpoint, so a resumed run ends with its own weights
        if stage == "fit":
            self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Load the stage-1 checkpoint ``init_from`` into the vision side (once; a no-op without it)."""
        if self.hparams.init_from and not self._stage1_loaded:
            load_stage1_weights(self.model.vision, read_checkpoint(self.hparams.init_from), self.hparams.init_from)
            self._stage1_loaded = True

    # ------------------------------------------------------------------ losses
    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """All stage-2 loss terms of a batch (each logged) and ``loss``, their weighted sum."""
        hp = self.hparams
        terms = self.model.losses(
            batch,
            mask=hp.mask_loss_weight > 0,
            referring=hp.referring_weight > 0,
            spatial=hp.spatial_weight > 0,
            vision_questions=hp.vision_question_weight > 0,
            classification=hp.classification_weight > 0,
            consistency_pairing=hp.consistency_pairing,
        )
        weights = {
            "caption_loss": hp.caption_weight, "consistency_loss": hp.consistency_weight, "mask_loss": hp.mask_loss_weight,
            "referring_loss": hp.referring_weight, "spatial_loss": hp.spatial_weight, "cls_loss": hp.classification_weight,
            "vision_question_loss": hp.vision_question_weight,
        }
        total = sum(weights[name] * value for name, value in terms.items() if name in weights)
        return {**terms, "loss": total}

    # ------------------------------------------------------------------ Lightning hooks
    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The training loss terms of a batch with the current weights (``CheckpointGate`` checks them before a checkpoint)."""
        return self.losses(batch)

    def configure_callbacks(self) -> list:
        from fineregion_pl.train.callbacks import CheckpointGate

        return [CheckpointGate()]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        language = self.model.language
        tokens_before = language.text_tokens
        losses = self.losses(batch)
        self.last_batch_tokens = language.text_tokens - tokens_before  # supervised text tokens (RegionThroughputMonitor)
        stop_on_non_finite_loss(self, losses)
        bs = batch["images"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/caption", losses["caption_loss"].detach(), prog_bar=True, batch_size=bs, logger=False)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=batch["images"].shape[0], sync_dist=True, prog_bar=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        encoded = self.model.encode(batch, self.hparams.ignore_regions)
        run = self._protocol_run()
        if run is not None:  # a published protocol (--data.protocol): its own rows and collector
            self.protocol_collector.add(protocol_rows(self.model, batch, encoded, run.protocol.task, score_captions=run.densecap_map))
            return
        rows = self.model.describe_batch(batch, encoded)
        self.collector.add(batch, rows, grounding=ground_expressions(self.model, batch, encoded), spatial=answer_questions(self.model, batch, encoded),
                           grounding_keys=grounding_keys(batch, encoded), vision=answer_vision_questions(self.model, batch, encoded))

    def on_test_epoch_start(self) -> None:
        self.collector.reset()
        self.protocol_collector.reset()
        run = self._protocol_run()
        datamodule = getattr(self.trainer, "datamodule", None)
        without_java = run.score_without_java if run is not None else getattr(getattr(datamodule, "hparams", None), "score_without_java", False)
        captions = run is None or run.protocol.task in ("regcap", "densecap")
        if (captions and not without_java) or (run is not None and run.densecap_map):  # DenseCap mAP needs METEOR
            require_java()  # stop before the model runs, not after hours of generation

    def _protocol_run(self):
        """The DataModule's protocol run (``--data.protocol``), or None for the shards' test split."""
        return getattr(getattr(self.trainer, "datamodule", None), "protocol_run", None)

    def on_test_epoch_end(self) -> None:
        out_dir = Path(self.hparams.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        model = model_fields(self.model.config, self.trainer.ckpt_path, self.trainer.world_size, self.hparams.ignore_regions)
        run = self._protocol_run()
        if run is not None:
            self.protocol_collector.finish(run, out_dir, model)  # every rank joins the merge; rank 0 writes
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        java = not getattr(getattr(datamodule, "hparams", None), "score_without_java", False)
        results = self.collector.compute(self.hparams.categories or [], self.hparams.num_classes, java=java)
        if results is None:  # not rank 0
            return
        for section in ("classification", "caption", "gt-ranking", "spatial", "vision_questions"):
            for name, value in results.get(section, {}).items():
                if isinstance(value, float):
                    self.log(f"test/{section}/{name}", value, rank_zero_only=True)
        source = datamodule.test_source() if hasattr(datamodule, "test_source") else None
        self.collector.write(results, out_dir, source, model, java)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict]:
        if batch is None:  # every image of the batch was skipped (counted by the prediction writer)
            return []
        return self.model.describe_batch(batch, ignore_regions=self.hparams.ignore_regions)

    # ------------------------------------------------------------------ optimisation and checkpoints
    def configure_optimizers(self) -> dict:
        lr = self.hparams.lr
        groups = [
            {"params": list(self.model.prompt.parameters()), "lr": lr},
            {"params": list(self.model.language.parameters()), "lr": self.hparams.lora_lr or lr},
            {"params": list(self.model.vision.parameters()), "lr": self.hparams.encoder_lr},
        ]
        return adamw_with_schedule(groups, self.hparams.weight_decay, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches)

    def frozen_lm_keys(self) -> set[str]:
        """State-dict keys (of this module) of frozen language-model weights (the base LM under LoRA)."""
        return {CHECKPOINT_PREFIX + key for key in self.model.frozen_language_keys()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_lm_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["frozen_lm_from"] = self.hparams.language_model["name_or_path"]
        if frozen:
            checkpoint["frozen_lm_fingerprint"] = lm_fingerprint(checkpoint["frozen_lm_from"], self.model.language.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits, then fill in the frozen LM weights (loaded from the base LM)."""
        state = {CHECKPOINT_PREFIX + k: v for k, v in captioner_weights(checkpoint["state_dict"]).items()}
        own = self.state_dict()
        frozen = self.frozen_lm_keys()
        try:
            check_weights_fit(own, state, "checkpoint", "this Stage2Module", may_miss=frozen)
        except BadInputError as err:
            raise BadInputError(f"{err} (a stage-1 checkpoint goes to `init_from`, not `ckpt_path`)") from None
        if frozen - set(state):  # the frozen LM comes from name_or_path: is it the one trained on?
            name = self.hparams.language_model["name_or_path"]
            note = check_fingerprint(checkpoint.get("frozen_lm_fingerprint"), name, self.model.language.model, "the checkpoint", self.hparams.allow_other_base_lm)
            if note:
                warnings.warn(note, stacklevel=2)
        for key in frozen - set(state):
            state[key] = own[key]
        checkpoint["state_dict"] = state


def resolve_from_stage1(hparams: dict[str, Any]) -> dict[str, Any]:
    """``encoder``, ``num_classes``, ``categories``, ``head_hidden`` and ``attn_dim``, each taken from
    the stage-1 checkpoint ``init_from`` when not given (the file is read only if one is missing)."""
    keys = ("encoder", "num_classes", "categories", "head_hidden", "attn_dim")
    given = {k: hparams.get(k) for k in keys}
    stage1: dict[str, Any] = {}
    if hparams.get("init_from") and any(v is None for v in given.values()):
        stage1 = read_checkpoint(hparams["init_from"]).get("hyper_parameters", {})
    encoder = optional_config(EncoderConfig, given["encoder"]) or optional_config(EncoderConfig, stage1.get("encoder"))
    if encoder is None:
        raise BadInputError("Stage2Module needs `encoder` or `init_from` (a stage-1 checkpoint to take the encoder from)")
    num_classes = given["num_classes"] or stage1.get("num_classes")
    if not num_classes:
        raise BadInputError("Stage2Module needs `num_classes` or `init_from` (a stage-1 checkpoint to take it from)")
    return {
        "encoder": encoder,
        "num_classes": num_classes,
        "categories": given["categories"] or stage1.get("categories"),
        "head_hidden": given["head_hidden"] or stage1.get("head_hidden", 256),
        "attn_dim": given["attn_dim"] or stage1.get("attn_dim", 64),
    }
