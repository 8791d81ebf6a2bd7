"""The language side: a Hugging Face LM (causal or encoder-decoder) with peft LoRA, driven by soft prompts.

:class:`RegionLanguageModel` builds, for ``R`` regions at once, the sequences
``[template text | region prompt | template text | ... | target text]`` in the LM's embedding
space, and gives the text loss (eq. 8), per-sequence log-likelihoods (for grounding), a caption
representation (for eq. 9) and batched generation. A task is a template: ``caption`` (describe
one region), ``referring`` (a referring expression for one region), ``question`` (a spatial
question about two regions) and ``vision_question:<relation>`` (what is in ``relation`` to one
anchor region); ``{region}`` marks where a region prompt goes. It knows nothing of
Lightning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fineregion_pl.model.chunked_loss import token_nll
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.packing import PackedLayout, pack_layout, packed_embeddings, segment_mean, shared_context_layout
from fineregion_pl.model.precision import language_model_dtype

IGNORE = -100
VISION_QUESTION = "vision_question"


def vision_question_task(relation: str) -> str:
    """The task name of a one-anchor question with ``relation`` (its own template, see
    ``LanguageModelConfig.vision_question_template``)."""
    return f"{VISION_QUESTION}:{relation}"

PACKED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
"""Decoder families whose transformers 5.x forward builds its mask with ``create_causal_mask(...,
position_ids=...)``, which finds packed sequences from ``position_ids`` (tested: llama, qwen2)."""

if TYPE_CHECKING:
    import transformers


@dataclass
class LoraSettings:
    """peft LoRA settings; ``enabled: false`` means full fine-tuning of the LM.

    ``target_modules``: ``null`` for peft's default for the model family (``q_proj, v_proj`` for
    Llama/Qwen, ``c_attn`` for GPT-2, ``q, v`` for T5), ``all-linear``, or a list of module names.
    """

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[Union[str, list[str]]] = None


@dataclass
class LanguageModelConfig:
    """Which language model to load and how.

    Attributes:
        name_or_path: a Hugging Face hub name or a local folder saved with ``save_pretrained``.
        dtype: load dtype: ``auto`` follows the trainer's precision (bfloat16 under ``bf16-mixed``,
            float16 under ``16-mixed``, float32 under ``32-true`` and outside a trainer), or
            ``bfloat16``/``float16``/``float32`` (see :mod:`fineregion_pl.model.precision`).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (when installed).
        gradient_checkpointing: recompute LM activations in backward.
        lora: LoRA settings.
        caption_template: instruction for captions; ``{region}`` marks where the region prompt goes.
        referring_template: instruction for referring expressions (grounding scores them).
        question_template: instruction for spatial questions about two regions (two ``{region}``).
        vision_question_template: instruction for one-anchor questions ("what is left of ...?"),
            with one ``{region}`` (the anchor) and one ``{relation}``; one task per entry of
            ``relations`` (``vision_question:<relation>``), whose answer must come from the image.
        relations: the relation phrases of ``vision_question_template``, as the questions word them.
        packed_sequences: teacher-force the sequences of a step packed into few rows (no padding
            to the longest, attention kept inside each sequence by restarting ``position_ids``) and
            apply the LM head only where a loss reads it, in chunks (:mod:`~fineregion_pl.model.packing`,
            :mod:`~fineregion_pl.model.chunked_loss`); for decoder LMs of :data:`PACKED_FAMILIES`
            whose head is not ZeRO-3-partitioned, others take the padded path. ``false``: the
            padded, full-logits path (one forward per call).
    """

    name_or_path: str = "runs/quickstart/tiny-lm"
    dtype: Optional[str] = "auto"
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    caption_template: str = "describe the region {region} :"
    referring_template: str = "refer to the region {region} :"
    question_template: str = "where is the region {region} relative to the region {region} ?"
    vision_question_template: str = "what is {relation} the region {region} ?"
    relations: list[str] = field(default_factory=lambda: ["left of", "right of", "above", "below"])
    packed_sequences: bool = True


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute the LM's layer activations in backward (transformers' own checkpointing), with the
    input embeddings requiring grad so that a frozen embedding layer does not cut the graph."""
    # transformers 5.x renamed gradient_checkpointing_enable (deprecated, removed in v6)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def load_language_model(config: LanguageModelConfig, precision: Optional[str] = None) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase, bool]:
    """Load the LM and tokenizer with ``from_pretrained`` and wrap the LM with LoRA.

    Returns ``(model, tokenizer, is_encoder_decoder)``. With LoRA only the adapter weights are
    trainable; with ``lora.enabled: false`` every LM weight is.
    """
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    try:
        lm_config = transformers.AutoConfig.from_pretrained(config.name_or_path)
    except (OSError, ValueError) as err:
        raise BadInputError(f"cannot load language model {config.name_or_path!r}: {str(err).splitlines()[0]}") from None
    encoder_decoder = bool(getattr(lm_config, "is_encoder_decoder", False))
    auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
    kwargs = {"dtype": language_model_dtype(config.dtype, precision)}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = auto.from_pretrained(config.name_or_path, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.name_or_path)
    model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as found
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if config.lora.enabled:
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type=TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM,
        )
        model = get_peft_model(model, lora)
        _initialise_partitioned_lora(model)
    return model, tokenizer, encoder_decoder


def _gathered(params: list[torch.nn.Parameter]):
    """Full values of DeepSpeed ZeRO-3 partitioned parameters inside the block (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def _initialise_partitioned_lora(model: nn.Module) -> None:
    """peft initialises LoRA in place (B = 0); on ZeRO-3 partitions that does nothing: gather and redo it."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            params = [p for n, p in module.named_parameters() if "lora_" in n]
            if any(hasattr(p, "ds_id") for p in params):
                import deepspeed

                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    for adapter in module.lora_A:
                        module.reset_lora_parameters(adapter, True)


class RegionLanguageModel(nn.Module):
    """A LoRA language model that reads region prompts and writes or scores text.

    Args:
        config: the LM to load and its template.
        precision: the trainer's precision (``bf16-mixed``...), which ``dtype: auto`` follows; ``None`` outside a trainer.
    """

    def __init__(self, config: LanguageModelConfig, precision: Optional[str] = None):
        super().__init__()
        self.config = config
        self.model, self.tokenizer, self.encoder_decoder = load_language_model(config, precision)
        self.templates = {
            "caption": self._template_ids(config.caption_template, slots=1),
            "referring": self._template_ids(config.referring_template, slots=1),
            "question": self._template_ids(config.question_template, slots=2),
        }
        for relation in config.relations:
            self.templates[vision_question_task(relation)] = self._template_ids(config.vision_question_template.replace("{relation}", relation), slots=1)
        self.text_tokens = 0  # target tokens (EOS included) teacher-forced so far; Stage2Module reads the increase per step

    def _template_ids(self, template: str, slots: int) -> list[list[int]]:
        """Token ids of the text pieces around the ``{region}`` slots (BOS first for causal LMs)."""
        pieces = template.split("{region}")
        if len(pieces) != slots + 1:
            raise ValueError(f"template {template!r} must contain '{{region}}' exactly {slots} time(s)")
        ids = [self.tokenizer(p.strip(), add_special_tokens=False)["input_ids"] if p.strip() else [] for p in pieces]
        if not self.encoder_decoder and self.tokenizer.bos_token_id is not None:
            ids[0] = [self.tokenizer.bos_token_id] + ids[0]
        if self.encoder_decoder and self.tokenizer.eos_token_id is not None:
            ids[-1] = ids[-1] + [self.tokenizer.eos_token_id]
        return ids

    @property
    def hidden_size(self) -> int:
        embedding = self.model.get_input_embeddings()
        return getattr(embedding, "embedding_dim", None) or embedding.weight.shape[-1]

    def embedding_rms(self) -> float:
        """Root mean square of the LM's input embedding entries (the scale soft tokens should have)."""
        weight = self.model.get_input_embeddings().weight
        with _gathered([weight]):
            return float(weight.detach().float().pow(2).mean().sqrt())

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def context_embeddings(self, prompts: Tensor | list[Tensor], task: str = "caption") -> Tensor:
        """Soft prompts placed in a task's template: ``(R, L, d)``, the same ``L`` for every row.

        Args:
            prompts: ``(R, p, d)`` for one-region tasks, or one such tensor per ``{region}`` slot.
            task: ``caption``, ``referring`` or ``question``.
        """
        prompts = [prompts] if isinstance(prompts, Tensor) else list(prompts)
        pieces = self.templates[task]
        if len(prompts) != len(pieces) - 1:
            raise ValueError(f"the {task} template has {len(pieces) - 1} region slot(s), got {len(prompts)} prompt tensor(s)")
        weight = self.model.get_input_embeddings().weight
        rows = prompts[0].shape[0]
        parts = []
        for i, ids in enumerate(pieces):
            if ids:
                parts.append(self.embed(torch.tensor(ids, device=weight.device))[None].expand(rows, -1, -1))
            if i < len(prompts):
                parts.append(prompts[i].to(weight.dtype))
        return torch.cat(parts, dim=1)

    def tokenize_targets(self, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Texts to right-padded ``(R, T)`` ids ending in EOS, and their mask."""
        eos = self.tokenizer.eos_token_id
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        length = max(len(i) for i in ids)
        out = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        self.text_tokens += int(mask.sum())  # counted on the CPU before the copy: no device sync
        return out.to(device), mask.to(device)

    def teacher_forced(self, prompts: Tensor | list[Tensor], texts: list[str], task: str = "caption") -> tuple[Tensor, Tensor, Tensor]:
        """Run the LM on prompts (in ``task``'s template) followed by ``texts``.

        Returns ``(logits, targets, hidden)`` aligned so that ``logits[:, t]`` predicts
        ``targets[:, t]``: ``(R, T, V)``, ``(R, T)`` with ``-100`` on padding, and the last hidden
        states ``(R, T, d)`` at the same positions.
        """
        context = self.context_embeddings(prompts, task)
        ids, mask = self.tokenize_targets(texts, context.device)
        targets = ids.masked_fill(~mask, IGNORE)
        if self.encoder_decoder:
            out = self.model(
                inputs_embeds=context,
                attention_mask=torch.ones(context.shape[:2], dtype=torch.long, device=context.device),
                labels=targets,
                output_hidden_states=True,
            )
            return out.logits, targets, out.decoder_hidden_states[-1]
        embeds = torch.cat([context, self.embed(ids)], dim=1)
        attention = torch.cat([torch.ones(context.shape[:2], dtype=torch.bool, device=context.device), mask], dim=1)
        out = self.model(inputs_embeds=embeds, attention_mask=attention.long(), output_hidden_states=True)
        start = context.shape[1] - 1  # the position whose output predicts the first text token
        span = slice(start, start + ids.shape[1])
        return out.logits[:, span], targets, out.hidden_states[-1][:, span]

    @property
    def packs(self) -> bool:
        """Whether text calls run packed (see ``LanguageModelConfig.packed_sequences``)."""
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        # ZeRO-3 partitions the LM head's weight and gathers it only inside the head's own forward;
        # the chunked loss reads the weight directly (and again in backward): padded path there
        partitioned = hasattr(self.model.get_output_embeddings().weight, "ds_id")
        return bool(self.config.packed_sequences) and not self.encoder_decoder and model_type in PACKED_FAMILIES and not partitioned

    def text_loss(self, prompts: Tensor | list[Tensor], texts: list[str], task: str = "caption") -> tuple[Tensor, Tensor]:
        """Cross-entropy on the target tokens only (eq. 8, averaged over tokens) and the text representation.

        The representation ``C_i`` (for ``L_consistency``) is the mean of the LM's last hidden
        states over the positions that predict the caption, L2-normalised: the LM head reads
        the caption off exactly these states, it is differentiable, and it costs nothing extra.
        """
        return self.text_losses([(prompts, texts, task)])[0]

    def text_losses(self, calls: list[tuple[Tensor | list[Tensor], list[str], str]]) -> list[tuple[Tensor, Tensor]]:
        """:meth:`text_loss` of several ``(prompts, texts, task)`` calls, in one packed LM forward when packing."""
        if not self.packs:
            return [self._padded_text_loss(*call) for call in calls]
        layout, hidden, nll = self._packed(calls)
        sums = nll.new_zeros(len(calls)).index_add(0, layout.call, nll)
        reps = F.normalize(segment_mean(hidden.float(), layout.sequence, layout.sequence_tokens), dim=-1)
        sizes = [len(texts) for _, texts, _ in calls]
        return [(sums[c] / max(1, tokens), rep) for c, (tokens, rep) in enumerate(zip(layout.call_tokens, reps.split(sizes)))]

    def _packed(self, calls: list[tuple[Tensor | list[Tensor], list[str], str]]) -> tuple[PackedLayout, Tensor, Tensor]:
        """One forward of the calls' sequences packed: the layout, the last hidden states of the
        predicting positions ``(P, d)`` and the target tokens' negative log-likelihoods ``(P,)``."""
        contexts = [self.context_embeddings(prompts, task) for prompts, _, task in calls]
        text_ids = self._target_ids([texts for _, texts, _ in calls])
        layout = pack_layout([c.shape[1] for c in contexts], [c.shape[0] for c in contexts], text_ids, contexts[0].device)
        hidden, nll = self._layout_forward(layout, contexts, [ids for call in text_ids for ids in call])
        return layout, hidden, nll

    def _target_ids(self, calls_texts: list[list[str]]) -> list[list[list[int]]]:
        """Per call, per text, its token ids followed by EOS (each distinct text tokenised once:
        grounding repeats each expression per candidate); counted in :attr:`text_tokens`."""
        eos = self.tokenizer.eos_token_id
        unique = list(dict.fromkeys(t for texts in calls_texts for t in texts))
        tokens = dict(zip(unique, self.tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}
        text_ids = [[tokens[t] + [eos] for t in texts] for texts in calls_texts]
        self.text_tokens += sum(len(ids) for call in text_ids for ids in call)
        return text_ids

    def _layout_forward(self, layout: PackedLayout, contexts: list[Tensor], text_ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """One LM forward of a packed ``layout`` (its ``attention_mask`` if it has one, else the mask
        transformers derives from ``position_ids``): the last hidden states of the predicting
        positions ``(P, d)`` and the target tokens' negative log-likelihoods ``(P,)``."""
        device = contexts[0].device
        flat = torch.tensor([t for ids in text_ids for t in ids], dtype=torch.long, device=device)
        embeds = packed_embeddings(layout, contexts, self.embed(flat))
        # the whole model's forward (its hooks: peft, FSDP, DeepSpeed), but logits of no position
        out = self.model(inputs_embeds=embeds, attention_mask=layout.attention_mask, position_ids=layout.position_ids, use_cache=False,
                         output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
        hidden = out.hidden_states[-1].flatten(0, 1).index_select(0, layout.predict)
        return hidden, token_nll(hidden, self.model.get_output_embeddings(), layout.targets)

    def _padded_text_loss(self, prompts: Tensor | list[Tensor], texts: list[str], task: str) -> tuple[Tensor, Tensor]:
        logits, targets, hidden = self.teacher_forced(prompts, texts, task)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        weights = (targets != IGNORE).to(hidden.dtype)[..., None]
        rep = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return loss, F.normalize(rep.float(), dim=-1)

    @torch.no_grad()
    def log_likelihood(self, prompts: Tensor | list[Tensor], texts: list[str], task: str = "referring") -> Tensor:
        """Sum of token log-probabilities of each text (EOS included) given its prompt: ``(R,)``."""
        return self.log_likelihoods([(prompts, texts, task)])[0]

    @torch.no_grad()
    def log_likelihoods(self, calls: list[tuple[Tensor | list[Tensor], list[str], str]]) -> list[Tensor]:
        """:meth:`log_likelihood` of several ``(prompts, texts, task)`` calls, in one packed forward when packing."""
        if not self.packs:
            return [self._padded_log_likelihood(*call) for call in calls]
        layout, _, nll = self._packed(calls)
        sizes = [len(texts) for _, texts, _ in calls]
        sums = nll.new_zeros(sum(sizes)).index_add(0, layout.sequence, -nll)
        return list(sums.split(sizes))

    @torch.no_grad()
    def log_likelihood_shared(self, prompts: Tensor, texts: list[str], owners: list[int], task: str = "referring") -> Tensor:
        """``log_likelihood(prompts[owners], texts, task)``, each prompt's context computed once.

        Grounding scores every expression of an image against every region of that image: the
        region's context (template + soft tokens) is the same for all of them. Here it is one
        prefix that each of its texts attends to (:func:`~fineregion_pl.model.packing.shared_context_layout`),
        instead of one copy per text. Needs an attention that takes a custom mask (``sdpa``,
        ``eager``) and a packing family; otherwise the same numbers come from :meth:`log_likelihood`.
        """
        if not texts:
            return prompts.new_zeros(0)
        if not (self.packs and self._attention_takes_custom_masks()):
            return self.log_likelihood(prompts[torch.as_tensor(owners, device=prompts.device)], texts, task)
        context = self.context_embeddings(prompts, task)
        (text_ids,) = self._target_ids([texts])
        layout = shared_context_layout(context.shape[1], owners, text_ids, context.device, context.dtype)
        _, nll = self._layout_forward(layout, [context], text_ids)
        return nll.new_zeros(len(texts)).index_add(0, layout.sequence, -nll)

    def _attention_takes_custom_masks(self) -> bool:
        """Whether the LM's attention reads a 4D additive mask as given (flash-attention's varlen path does not)."""
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None) in ("sdpa", "eager")

    def _padded_log_likelihood(self, prompts: Tensor | list[Tensor], texts: list[str], task: str) -> Tensor:
        logits, targets, _ = self.teacher_forced(prompts, texts, task)
        logp = logits.float().log_softmax(-1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * (targets != IGNORE)).sum(-1)

    @torch.no_grad()
    def generate(self, prompts: Tensor | list[Tensor], max_new_tokens: int = 16, num_beams: int = 1, task: str = "caption") -> list[str]:
        """Greedy (``num_beams=1``) or beam-search texts for ``R`` prompts in one batch.

        Every prompt has the same length (template + ``k + 1`` soft tokens), so no prompt is
        padded and a region's caption does not depend on which other regions share its batch.
        """
        context = self.context_embeddings(prompts, task)
        if context.shape[0] == 0:
            return []
        attention = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
        out = self.model.generate(
            inputs_embeds=context,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
