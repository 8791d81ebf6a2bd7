"""Scale plan: FLOPs per sample, memory per GPU and epoch time of the real-scale recipes on H100s.

    python benchmarks/plan.py               # prints the tables and their assumptions
    python benchmarks/plan.py --markdown    # also writes docs/plan.md
    python benchmarks/plan.py --llm Qwen/Qwen2.5-0.5B-Instruct   # another LM of LLM_CONFIGS in the recipe's place

Nothing here is timed. The package's own modules are built on the ``meta`` device (shapes, no
weights, no memory) from the recipes, ``configs/stage2.yaml`` and ``configs/stage1.yaml``:

- stage 2: ``Stage2Module(**model.init_args)`` (so the parts it freezes are frozen), holding a
  ``RegionCaptioner`` (``RegionVisionModel`` with the stage-1 recipe's encoder, ``RegionPrompt``,
  ``RegionLanguageModel``). The LM is built as ``load_language_model`` builds it, with
  ``transformers.AutoModelForCausalLM.from_config`` of a hand-written config of the named model
  in place of ``from_pretrained`` (the hub is not reachable here), then peft LoRA with the
  recipe's settings; ``RegionLanguageModel.__init__`` itself runs, with that builder in place of
  its loader;
- stage 1: ``Stage1Module(**model.init_args)``.

One training step of one per-GPU batch then runs through the package's functions (see
:func:`stage2_terms`: ``RegionCaptioner.encode``, ``RegionLanguageModel.text_loss`` for captions,
referring expressions and spatial questions with ``RegionCaptioner.question_prompts`` and its pair
token, ``consistency_loss``, ``mask_loss``, weighted as ``Stage2Module.losses`` weights them), then
``backward``:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the step (forward, then
  ``backward``). It counts matmuls, convolutions and attention (2 FLOPs per multiply-add), not
  element-wise ops. The backward is counted, not assumed: autograd computes only the gradients
  something needs, so frozen weights (the LM's base weights under LoRA, the Swin's frozen first
  stage) get no weight-gradient matmuls, and the LM's backward is about 1x its forward (input
  gradients, plus the small LoRA weight gradients) instead of the 2x of full fine-tuning.
  Gradient checkpointing recomputes the forward of every checkpointed block that has something to
  train (the LM's decoder layers, the trainable Swin stages): counted separately, from the
  per-module forward counts.
- Activation memory: ``torch.autograd.graph.saved_tensors_hooks`` over the same step records every
  tensor autograd saves for backward (parameters excluded; views counted once, at their base's
  size), attributed to the checkpointed block it was saved in. With checkpointing a block keeps
  only its input, and one block's saved tensors exist at a time during backward, so activations
  = saved outside blocks + block inputs + the largest block's saved tensors.
- Parameters: counted from the same modules (``requires_grad`` as ``Stage2Module`` leaves it).

The data sizes (images, regions, text lengths) are stated with their sources or as assumptions.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from fineregion_pl.model.chunked_loss import DEFAULT_CHUNK  # noqa: E402
from fineregion_pl.model.language_model import PACKED_FAMILIES, enable_activation_checkpointing  # noqa: E402
from fineregion_pl.model.packing import packed_rows  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM, bf16 dense (no sparsity)
H100_MEMORY = 80e9
DEFAULT_MFU = 0.40
GPU_COUNTS = (8, 32, 128)
NVLINK_BW = 350e9  # bytes/s per GPU a collective achieves inside an 8-GPU NVLink node (assumed)
INTERNODE_BW = 50e9  # bytes/s per GPU across nodes: one 400 Gb/s NIC per GPU (assumed)
CUDA_SLACK = 2e9  # bytes per GPU for the CUDA context and allocator slack (assumed)
PROCESS_BASELINE = 0.9e9  # resident bytes of a Python process with torch, lightning, transformers, timm, peft and the package imported (measured here)

# Hand-written configs of the models the recipes name (values from the models' config.json);
# `family` is the transformers model type, `bos_token` whether the tokenizer puts a BOS first.
QWEN25_7B = dict(
    family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, bos_token=False,
)
QWEN25_05B = dict(
    family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, bos_token=False,
)
LLM_CONFIGS = {
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B,
    "Qwen/Qwen2.5-7B": QWEN25_7B,
    "Qwen/Qwen2.5-0.5B-Instruct": QWEN25_05B,
    "Qwen/Qwen2.5-0.5B": QWEN25_05B,
}
SMALL_LLM = "Qwen/Qwen2.5-0.5B-Instruct"  # the one-process table's second row


@dataclass
class Dataset:
    """What one epoch of a shard set holds, and how long its texts are."""

    name: str
    train_images: int
    regions_per_image: float  # before max_regions
    caption_tokens: float  # mean target tokens of a caption, EOS included
    referring: bool  # its regions have referring expressions (the referring loss uses them)
    questions_per_image: float  # spatial questions whose two regions are both in the sample
    source: str


# RefCOCOg (umd split, Nagaraja et al. 2016): train 80,512 expressions of 42,226 objects in 21,899
# images (val 2,573 / test 5,023 refs, as the fixtures README states). The converter makes one
# region per annotated object, its expressions as captions and referring expressions.
# Visual Genome v1.2: 108,077 images, ~5.4 M region descriptions (~50 per image), ~2.3 M
# relationships; the converter's default split gives 90% of the images to train.
DATASETS = [
    Dataset("RefCOCOg umd", 21_899, 42_226 / 21_899, 8.4 * 1.2 + 1, True, 0.0,
            "train: 21,899 images, 42,226 objects, 80,512 expressions (8.4 words each on average)"),
    Dataset("Visual Genome", round(0.9 * 108_077), 50.0, 5.0 * 1.2 + 1, False, 2.0,
            "108,077 images x 0.9 (the converter's default train share) = 97,269; ~50 region phrases per image of ~5 words"),
]
DECODE_RATE = (40, 70)  # images/s one dataloader worker decodes + letterboxes (640x480 JPEG to 384 px), measured here once
TOKENS_PER_WORD = 1.2  # English words to Qwen BPE tokens (common words are one token; assumed)
PADDED_TARGET = {"caption": 20, "referring": 20, "question": 4}  # longest target of a call in a mixed batch (assumed)
ANSWER_TOKENS = 2.0  # a spatial answer / VG predicate + EOS


def template_pieces(template: str) -> list[int]:
    """Token counts of the text pieces around ``{region}`` (words and punctuation marks)."""
    return [len(re.findall(r"\w+|[^\w\s]", piece)) for piece in template.split("{region}")]


# ---------------------------------------------------------------------------- the package's modules on the meta device

FILLER = "word"  # the one word of every target text (one token each: see word_tokenizer)


def llm_config(name: str):
    """The transformers config of a model of :data:`LLM_CONFIGS`."""
    import transformers

    if name not in LLM_CONFIGS:
        raise SystemExit(f"plan.py: no hand-written config for {name!r}; add it to LLM_CONFIGS (known: {sorted(LLM_CONFIGS)})")
    spec = {k: v for k, v in LLM_CONFIGS[name].items() if k not in ("family", "bos_token")}
    return transformers.AutoConfig.for_model(LLM_CONFIGS[name]["family"], **spec, max_position_embeddings=32768)


def word_tokenizer(config, bos: bool):
    """A word-level tokenizer of the templates and :data:`FILLER` (the model's own cannot be downloaded):
    one token per word or punctuation mark, as :func:`template_pieces` counts; a BOS only if the LM has one."""
    from fineregion_pl.train.tiny_lm import train_word_tokenizer

    tokenizer = train_word_tokenizer([config.caption_template, config.referring_template, config.question_template, FILLER])
    if not bos:
        tokenizer.bos_token = None
    return tokenizer


def from_config_loader(name: str, dtype: torch.dtype, attn_implementation: str = "eager", gradient_checkpointing: bool = False) -> Callable:
    """What ``load_language_model`` does, with the LM built from its config instead of downloaded.

    ``AutoModelForCausalLM.from_config`` (in the current device context: meta), ``train()``, peft
    LoRA from ``config.lora`` exactly as ``load_language_model`` sets it up. The dtype is the plan's
    (bf16 for the recipe's ``dtype: bfloat16`` under ``bf16-mixed``, fp32 for the one-process table),
    whatever ``precision`` the caller passes. Two defaults differ from the recipe, both for the meta
    device: eager attention (sdpa's mask check reads the mask's values; the attention FLOPs are the
    same), and gradient checkpointing is not switched on but modelled (:class:`StepCount`); a
    benchmark on real tensors passes the recipe's ``attn_implementation`` and ``gradient_checkpointing``.
    """

    def load(config, precision: Optional[str] = None) -> tuple[torch.nn.Module, Any, bool]:
        import transformers
        from peft import LoraConfig, TaskType, get_peft_model

        model = transformers.AutoModelForCausalLM.from_config(llm_config(name), dtype=dtype, attn_implementation=attn_implementation)
        model.train()
        if gradient_checkpointing:
            enable_activation_checkpointing(model)
        tokenizer = word_tokenizer(config, LLM_CONFIGS[name]["bos_token"])
        if config.lora.enabled:
            lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              target_modules=config.lora.target_modules, task_type=TaskType.CAUSAL_LM)
            model = get_peft_model(model, lora)
        return model.to(dtype), tokenizer, False

    return load


def encoder_args(s1: dict) -> dict:
    """The stage-1 recipe's encoder, random-init (no download) and without running checkpointing (it is modelled)."""
    return dict(s1["model"]["init_args"]["encoder"], pretrained=False, grad_checkpointing=False)


def build_stage2(s1: dict, s2: dict, num_classes: int, llm_name: str, dtype: torch.dtype):
    """``Stage2Module`` of the stage-2 recipe on the meta device, its ``RegionCaptioner`` complete.

    The vision side is the stage-1 recipe's (what ``init_from`` would bring). The language model:
    ``RegionLanguageModel(config)`` with :func:`from_config_loader` in place of ``load_language_model``;
    the prompt as ``RegionCaptioner.build_language`` makes it, except its ``embed_scale`` (the LM's
    embedding RMS, a value meta weights do not have), which changes no shape.
    """
    from fineregion_pl.model import language_model
    from fineregion_pl.model.region_prompt import RegionPrompt
    from fineregion_pl.train.stage2 import Stage2Module

    stage1 = s1["model"]["init_args"]
    args = copy.deepcopy(s2["model"]["init_args"])
    args["language_model"]["name_or_path"] = llm_name
    args.update(init_from=None, results_dir=None, encoder=encoder_args(s1), num_classes=num_classes,
                head_hidden=stage1.get("head_hidden", 256), attn_dim=stage1.get("attn_dim", 64))
    with torch.device("meta"):
        module = Stage2Module(**args)
        captioner, cfg = module.model, module.model.config
        with mock.patch.object(language_model, "load_language_model", from_config_loader(llm_name, dtype)):
            language = language_model.RegionLanguageModel(cfg.language_model)
        prompt = RegionPrompt(captioner.vision.out_dim, language.hidden_size, cfg.prompt_tokens, cfg.prompt_mode, cfg.prompt_hidden)
    captioner._modules["language"], captioner._modules["prompt"] = language, prompt  # as build_language registers them
    return module.to(dtype).train()


def build_stage1(s1: dict, num_classes: int, dtype: torch.dtype):
    """``Stage1Module`` of the stage-1 recipe on the meta device."""
    from fineregion_pl.train.stage1 import Stage1Module

    args = dict(s1["model"]["init_args"], encoder=encoder_args(s1), num_classes=num_classes)
    with torch.device("meta"):
        module = Stage1Module(**args)
    return module.to(dtype).train()


def meta_nonzero():
    """``nonzero`` on meta tensors, as if every element were non-zero (torch's own switch for it)."""
    from torch.fx.experimental import _config

    return _config.patch(meta_nonzero_assume_all_nonzero=True)


def meta_inputs(images: int, max_regions: int, image_size: int, dtype: torch.dtype) -> dict:
    """What ``RegionCaptioner.encode`` / ``Stage1Module.forward`` read of a collated batch, as meta tensors."""
    return {
        "images": torch.empty(images, 3, image_size, image_size, device="meta", dtype=dtype),
        "boxes": torch.empty(images, max_regions, 4, device="meta", dtype=dtype),
        "region_valid": torch.ones(images, max_regions, dtype=torch.bool, device="meta"),
    }


def filler_texts(rows: int, tokens: int) -> list[str]:
    """``rows`` target texts of ``tokens`` tokens with the EOS (every call is padded to its longest)."""
    return [" ".join([FILLER] * (tokens - 1))] * rows


# ---------------------------------------------------------------------------- measuring one step


@dataclass
class StepCount:
    """FLOPs and saved-activation bytes of one training step of one per-GPU batch."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0  # forward FLOPs of checkpointed blocks that backward recomputes
    saved_other: float = 0.0  # activation bytes saved outside checkpointed blocks
    block_inputs: float = 0.0  # bytes of the inputs of checkpointed blocks (what checkpointing keeps)
    block_saved_max: float = 0.0  # the largest block's saved bytes
    block_saved_total: float = 0.0
    parts: dict = field(default_factory=dict)  # forward FLOPs by part

    @property
    def model_flops(self) -> float:
        return self.forward + self.backward

    @property
    def executed_flops(self) -> float:
        return self.forward + self.backward + self.recompute

    def activations(self, checkpointing: bool) -> float:
        if checkpointing:
            return self.saved_other + self.block_inputs + self.block_saved_max
        return self.saved_other + self.block_saved_total


def measure_step(modules: list[torch.nn.Module], step: Callable[[], torch.Tensor], block_pattern: str, parts: dict[str, str]) -> StepCount:
    """Count FLOPs and saved tensors of ``step()`` (which returns the loss) and its backward.

    ``block_pattern`` matches the qualified names (as ``FlopCounterMode`` reports them) of the
    checkpointed blocks; ``parts`` maps a label to a name pattern whose forward FLOPs to report.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = {id(p) for m in modules for p in m.parameters()}
    trainable_blocks: set[str] = set()
    blocks: dict[int, str] = {}
    for m in modules:
        for name, sub in m.named_modules():
            if re.search(block_pattern, f"{type(m).__name__}.{name}"):
                blocks[id(sub)] = f"{type(m).__name__}.{name}"
                if any(p.requires_grad for p in sub.parameters()):
                    trainable_blocks.add(blocks[id(sub)])
    stack: list[str] = []
    saved: dict[str, dict[int, int]] = {}
    keep: list[torch.Tensor] = []  # keeps ids unique while measuring
    inputs: dict[str, int] = {}

    def pre(module, args, kwargs):
        name = f"{blocks[id(module)]}#{len(inputs)}"  # one entry per call: a block can run several times a step
        stack.append(name)
        first = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        inputs[name] = first.numel() * first.element_size() if isinstance(first, torch.Tensor) else 0

    def post(module, args, out):
        stack.pop()

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params or isinstance(t, torch.nn.Parameter):
            return t
        keep.append(base)
        saved.setdefault(stack[-1] if stack else "", {})[id(base)] = base.numel() * base.element_size()
        return t

    handles = []
    for m in modules:
        for sub in m.modules():
            if id(sub) in blocks:
                handles += [sub.register_forward_pre_hook(pre, with_kwargs=True), sub.register_forward_hook(post)]
    try:
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
            forward = counter.get_total_flops()
            per_module = copy.deepcopy(counter.get_flop_counts())
            loss.backward()
            total = counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()

    def module_flops(name: str) -> float:
        return float(sum(per_module.get(name, {}).values()))

    count = StepCount(forward=float(forward), backward=float(total - forward))
    count.recompute = sum(module_flops(name) for name in trainable_blocks)
    block_bytes = {name: sum(v.values()) for name, v in saved.items() if name}
    count.saved_other = float(sum(saved.get("", {}).values()))
    count.block_inputs = float(sum(inputs.values()))
    count.block_saved_max = float(max(block_bytes.values(), default=0))
    count.block_saved_total = float(sum(block_bytes.values()))
    for label, pattern in parts.items():
        count.parts[label] = sum(module_flops(n) for n in per_module if re.fullmatch(pattern, n))
    return count



# ---------------------------------------------------------------------------- the stage-2 plan


def read_config(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@dataclass
class Batch:
    """The per-GPU batch: images by shard set and the rows/lengths of each text call."""

    images: int
    max_regions: int
    rows: dict[str, int]
    lengths: dict[str, int]  # padded sequence length of each call
    real_tokens: float  # tokens without padding
    padded_tokens: float
    targets: dict[str, int] = field(default_factory=lambda: dict(PADDED_TARGET))  # padded target length of each call
    text_lengths: dict[str, list[int]] = field(default_factory=dict)  # each sequence's target length (packed step)
    packed_tokens: float = 0.0  # rows x width of the packed layout of all calls (model/packing.py)
    packed: bool = False  # the recipe's LM packs its calls (packed_sequences, a packing family)
    packed_padding: float = 0.0  # share of the packed layout's tokens that are filler

    @property
    def lm_tokens(self) -> float:
        """Tokens the LM runs per step: the packed layout's, or every call padded to its longest."""
        return self.packed_tokens if self.packed else self.padded_tokens


def stage2_batch(s2: dict, datasets: list[Dataset], weights: list[float], llm_name: Optional[str] = None,
                 padded_target: Optional[dict[str, int]] = None) -> Batch:
    """Rows and padded lengths of the LM calls of one per-GPU batch of the stage-2 recipe.

    A call's context is its template's pieces, a BOS when the LM has one, and ``k + 1`` soft tokens
    per region slot; the question's second slot also gets the pair token (adaptive prompts).
    """
    model = s2["model"]["init_args"]
    lm = model["language_model"]
    data = s2["data"]
    images, max_regions, k = int(data["batch_size"]), int(data["max_regions"]), int(model["prompt_tokens"]) + 1
    share = [w / sum(weights) for w in weights]
    regions = [images * s * min(d.regions_per_image, max_regions) for d, s in zip(datasets, share)]
    referring_rows = sum(r for r, d in zip(regions, datasets) if d.referring) if model.get("referring_weight", 0) > 0 else 0
    question_rows = sum(images * s * d.questions_per_image for d, s in zip(datasets, share)) if model.get("spatial_weight", 0) > 0 else 0
    bos = 1 if LLM_CONFIGS[llm_name or lm["name_or_path"]]["bos_token"] else 0
    pair = 1 if model.get("prompt_mode", "adaptive") == "adaptive" else 0
    caption_ctx = sum(template_pieces(lm["caption_template"])) + k + bos
    referring_ctx = sum(template_pieces(lm["referring_template"])) + k + bos
    question_ctx = sum(template_pieces(lm["question_template"])) + 2 * k + pair + bos
    target = dict(padded_target or PADDED_TARGET)
    rows = {"caption": round(sum(regions)), "referring": round(referring_rows), "question": round(question_rows)}
    lengths = {"caption": caption_ctx + target["caption"], "referring": referring_ctx + target["referring"],
               "question": question_ctx + target["question"]}
    real = sum(r * (caption_ctx + d.caption_tokens) for r, d in zip(regions, datasets))
    real += referring_rows * (referring_ctx + datasets[0].caption_tokens) + question_rows * (question_ctx + ANSWER_TOKENS)
    padded = sum(rows[t] * lengths[t] for t in rows)
    text_lengths = mixed_lengths(datasets, [images * s for s in share], max_regions, rows)
    contexts = {"caption": caption_ctx, "referring": referring_ctx, "question": question_ctx}
    sequences = [contexts[t] + n for t in rows for n in text_lengths[t]]
    width, bins = packed_rows(sequences)
    packed = bool(lm.get("packed_sequences", True)) and LLM_CONFIGS[llm_name or lm["name_or_path"]]["family"] in PACKED_FAMILIES
    return Batch(images, max_regions, rows, lengths, real, padded, target, text_lengths, float(len(bins) * width), packed,
                 1 - sum(sequences) / (len(bins) * width))


def mixed_lengths(datasets: list[Dataset], images: list[float], max_regions: int, rows: dict[str, int]) -> dict[str, list[int]]:
    """Each sequence's target length (EOS included) in a batch: every dataset's regions with its mean
    caption length rounded, the referring rows RefCOCOg's, the answers :data:`ANSWER_TOKENS`."""
    captions = [round(d.caption_tokens) for d, n in zip(datasets, images) for _ in range(round(n * min(d.regions_per_image, max_regions)))]
    captions = (captions + [captions[-1]] * rows["caption"])[: rows["caption"]] if captions else []
    referring = [round(d.caption_tokens) for d in datasets if d.referring][:1] * rows["referring"]
    return {"caption": captions, "referring": referring, "question": [round(ANSWER_TOKENS)] * rows["question"]}


def stage2_terms(module, inputs: dict, batch: Batch) -> dict[str, torch.Tensor]:
    """The loss terms ``RegionCaptioner.losses`` computes for the batch, by the same calls, on meta tensors.

    ``RegionCaptioner.losses`` itself reads values meta tensors do not have (``index.tolist()`` to
    pick each region's texts, ``labelled.any()`` for the accuracy), so this makes its calls, in its
    order, with the batch's counts:

    - ``RegionCaptioner.encode``: ``RegionVisionModel.forward`` on every image and region slot, then
      ``region_geometry`` and ``RegionPrompt``; meta ``nonzero`` counts every slot valid, so the
      prompts of all ``B x max_regions`` slots are made and the first ``rows["caption"]`` kept (the
      real step makes only the valid regions' prompts: a few MFLOP more here);
    - ``RegionLanguageModel.text_loss`` of the captions, and ``consistency_loss`` of their caption
      representations (meta ``nonzero`` pairs every two slots: an upper bound on intersecting pairs);
    - ``mask_loss`` (``mask_loss_weight > 0``); ``text_loss`` of the referring expressions; ``text_loss``
      of the spatial questions on ``RegionCaptioner.question_prompts`` (the first region's prompt, then
      the second's followed by ``RegionPrompt.pair_token``); the category cross-entropy over every slot
      (``classification_weight > 0``). ``acc`` is detached: no FLOPs, nothing saved.
    """
    from fineregion_pl.model.captioner import EncodedBatch

    hp, captioner = module.hparams, module.model
    language = captioner.language
    with meta_nonzero():
        encoded = captioner.encode(inputs)
    rows = batch.rows["caption"]
    encoded = EncodedBatch(vision=encoded.vision, index=encoded.index[:rows], prompts=encoded.prompts[:rows], geometry=encoded.geometry[:rows])
    out, index, prompts = encoded.vision, encoded.index, encoded.prompts
    if batch.packed and language.packs:
        return packed_terms(module, encoded, batch)
    caption, rep = language.text_loss(prompts, filler_texts(rows, batch.targets["caption"]), "caption")
    terms = region_terms(hp, out, index, caption, rep)
    if hp.referring_weight > 0 and batch.rows["referring"]:
        r = min(batch.rows["referring"], rows)
        terms["referring_loss"], _ = language.text_loss(prompts[:r], filler_texts(r, batch.targets["referring"]), "referring")
    if hp.spatial_weight > 0 and batch.rows["question"]:
        q = min(batch.rows["question"], rows // 2)
        slots = captioner.question_prompts(encoded, list(range(q)), list(range(q, 2 * q)))
        terms["spatial_loss"], _ = language.text_loss(slots, filler_texts(q, batch.targets["question"]), "question")
    terms.update(classification_terms(hp, out))
    return terms


def packed_terms(module, encoded, batch: Batch) -> dict[str, torch.Tensor]:
    """:func:`stage2_terms` as ``RegionCaptioner.losses`` makes them with a packing LM: the three text
    calls in one ``RegionLanguageModel.text_losses`` (one packed forward), each sequence with its own
    target length (:func:`mixed_lengths`)."""

    hp, captioner = module.hparams, module.model
    out, index, prompts = encoded.vision, encoded.index, encoded.prompts
    texts = {t: [" ".join([FILLER] * (n - 1)) for n in batch.text_lengths[t]] for t in batch.text_lengths}
    calls = {"caption_loss": (prompts, texts["caption"], "caption")}
    if hp.referring_weight > 0 and batch.rows["referring"]:
        r = min(batch.rows["referring"], prompts.shape[0])
        calls["referring_loss"] = (prompts[:r], texts["referring"][:r], "referring")
    if hp.spatial_weight > 0 and batch.rows["question"]:
        q = min(batch.rows["question"], prompts.shape[0] // 2)
        calls["spatial_loss"] = (captioner.question_prompts(encoded, list(range(q)), list(range(q, 2 * q))), texts["question"][:q], "question")
    with packing_on_meta():
        results = dict(zip(calls, captioner.language.text_losses(list(calls.values()))))
    caption, rep = results["caption_loss"]
    terms = region_terms(hp, out, index, caption, rep)
    terms.update({name: loss for name, (loss, _) in results.items() if name != "caption_loss"})
    terms.update(classification_terms(hp, out))
    return terms


def region_terms(hp, out, index, caption: torch.Tensor, rep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The caption loss, ``consistency_loss`` of the caption representations scattered back to their
    region slots, and ``mask_loss`` (``mask_loss_weight > 0``): shared by the padded and packed steps."""
    from fineregion_pl.model.losses import consistency_loss, mask_loss

    reps = rep.new_zeros(*out.region_valid.shape, rep.shape[-1])
    reps[index[:, 0], index[:, 1]] = rep
    with meta_nonzero():
        terms = {"caption_loss": caption, "consistency_loss": consistency_loss(reps, out.boxes, out.region_valid)}
    if hp.mask_loss_weight > 0:
        terms["mask_loss"] = mask_loss(out.attn_logits, out.target_masks, out.region_valid)
    return terms


def classification_terms(hp, out) -> dict[str, torch.Tensor]:
    """The category cross-entropy over every slot (``classification_weight > 0``), else nothing."""
    if hp.classification_weight <= 0:
        return {}
    logits = out.logits.flatten(0, 1)
    return {"cls_loss": F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))}


def packing_on_meta():
    """transformers' packed-sequence check reads a value (``.all()``) meta tensors lack: skip it (the
    layout always packs several sequences per row here, so the check would not return ``None``)."""
    from transformers import masking_utils

    def indices(position_ids):
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    return mock.patch.object(masking_utils, "find_packed_sequence_indices", indices)


def loss_weights(hparams) -> dict[str, float]:
    """The weight of each loss term, as ``Stage2Module.losses`` takes them from its hyper-parameters."""
    return {
        "caption_loss": hparams.caption_weight, "consistency_loss": hparams.consistency_weight, "mask_loss": hparams.mask_loss_weight,
        "referring_loss": hparams.referring_weight, "spatial_loss": hparams.spatial_weight, "cls_loss": hparams.classification_weight,
    }


def weighted_loss(hparams, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Stage2Module.losses``' ``loss``: the terms weighted by :func:`loss_weights`, summed."""
    weights = loss_weights(hparams)
    return sum(weights[name] * value for name, value in terms.items())


def check_call_lengths(module, batch: Batch) -> None:
    """The contexts the real templates and prompts make are as long as :func:`stage2_batch` counted."""
    language, prompt = module.model.language, module.model.prompt
    pair = 1 if prompt.mode == "adaptive" else 0
    for task, slots in (("caption", 1), ("referring", 1), ("question", 2)):
        context = sum(len(ids) for ids in language.templates[task]) + slots * prompt.length + (pair if slots == 2 else 0)
        if context != batch.lengths[task] - batch.targets[task]:
            raise AssertionError(f"plan.py: the {task} context is {context} tokens, stage2_batch counted {batch.lengths[task] - batch.targets[task]}")


def parameter_count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@dataclass
class Stage2Measure:
    """One stage-2 training step of the recipe's per-GPU batch, measured on the package's modules."""

    count: StepCount
    config: Any  # the LM's transformers config
    terms: dict[str, float]  # the loss terms the step computed, and their weights
    lm_total: int
    lm_trainable: int
    vision_total: int
    vision_trainable: int
    prompt: int
    transient: float  # bytes of the largest call's logits (every position, the whole vocabulary)
    layer_params: int  # parameters of one decoder layer (what ZeRO-3 gathers at a time)

    @property
    def trainable(self) -> int:
        return self.lm_trainable + self.vision_trainable + self.prompt

    @property
    def frozen(self) -> int:
        return self.lm_total - self.lm_trainable + self.vision_total - self.vision_trainable


def measure_stage2(s1: dict, s2: dict, batch: Batch, num_classes: int, llm_name: str, dtype: torch.dtype = torch.bfloat16) -> Stage2Measure:
    """Build the stage-2 module (:func:`build_stage2`) and count one step of :func:`stage2_terms`."""
    module = build_stage2(s1, s2, num_classes, llm_name, dtype)
    captioner = module.model
    check_call_lengths(module, batch)
    inputs = meta_inputs(batch.images, batch.max_regions, int(s2["data"]["image_size"]), dtype)
    terms: dict[str, float] = {}

    def step() -> torch.Tensor:
        values = stage2_terms(module, inputs, batch)
        terms.update({name: float(loss_weights(module.hparams)[name]) for name in values})
        return weighted_loss(module.hparams, values)

    llm = captioner.language.model
    parts = {"vision": r"RegionVisionModel", "prompt": r"RegionPrompt(\.pair)?", "llm": r"PeftModelForCausalLM|\w+ForCausalLM",
             "lm_head": r".*\.lm_head"}
    count = measure_step([captioner.vision, captioner.prompt, llm], step, r"(\.layers_\d+\.blocks\.\d+|\.layers\.\d+)$", parts)
    config = llm.config
    element = torch.finfo(dtype).bits // 8
    if batch.packed:  # chunked target-only logits, recomputed in backward: one chunk's fp32 logits are saved at a time
        count.parts["log_softmax_bytes"] = 0.0
    else:
        count.parts["log_softmax_bytes"] = sum(batch.rows[t] * batch.targets[t] for t in batch.rows) * config.vocab_size * 4  # fp32: text_loss casts
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return Stage2Measure(
        count=count, config=config, terms=terms,
        lm_total=parameter_count(llm), lm_trainable=parameter_count(llm, trainable=True),
        vision_total=parameter_count(captioner.vision), vision_trainable=parameter_count(captioner.vision, trainable=True),
        prompt=parameter_count(captioner.prompt, trainable=True),
        transient=(DEFAULT_CHUNK * config.vocab_size * 4 * 2 if batch.packed
                   else max(batch.rows[t] * batch.lengths[t] for t in batch.rows) * config.vocab_size * element),
        layer_params=parameter_count(base.model.layers[0]),
    )


def measure_stage1(s1: dict, num_classes: int, dtype: torch.dtype = torch.bfloat16) -> tuple[StepCount, int, int]:
    """Count one step of ``Stage1Module`` of the stage-1 recipe: its ``forward``, then the terms of its
    ``_losses`` (every slot labelled: ``_losses`` itself tests ``labelled.any()``, a value), then ``backward``."""
    from fineregion_pl.model.losses import mask_loss

    module = build_stage1(s1, num_classes, dtype)
    data = s1["data"]
    inputs = meta_inputs(int(data["batch_size"]), int(data["max_regions"]), int(data["image_size"]), dtype)

    def step() -> torch.Tensor:
        out = module(inputs)
        logits = out.logits.flatten(0, 1)
        cls = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        return cls + module.hparams.mask_loss_weight * mask_loss(out.attn_logits, out.target_masks, out.region_valid)

    count = measure_step([module], step, r"\.layers_\d+\.blocks\.\d+$", {"vision": r"Stage1Module"})
    return count, parameter_count(module.model), parameter_count(module.model, trainable=True)


# ---------------------------------------------------------------------------- memory and the tables


def zero_memory(stage: int, gpus: int, frozen: float, trainable: float, activations: float, transient: float, layer_params: float) -> dict:
    """Bytes per GPU under DeepSpeed ZeRO-``stage`` with bf16 weights and fp32 optimizer state."""
    shard = gpus if stage == 3 else 1
    mem = {
        "frozen weights (bf16)": frozen * 2 / shard,
        "trainable weights (bf16)": trainable * 2 / shard,
        "fp32 master + Adam m, v": trainable * 12 / gpus,
        "gradients (fp32, partitioned)": trainable * 4 / gpus,
        "comm buckets": 2 * 2e8 * 2,  # reduce + all-gather buckets of 2e8 elements in bf16 (configs/strategies)
        "activations (checkpointed)": activations,
        "transient logits (bf16)": transient,
    }
    if stage == 3:
        mem["gathered layers (bf16)"] = 2 * layer_params * 2  # the layer in use and the prefetched one
    return mem


def single_process_memory(m: Stage2Measure, checkpointing: bool) -> dict:
    """Bytes on the GPU of one process with fp32 weights and plain AdamW, no DeepSpeed: every weight in
    fp32, a fp32 gradient and AdamW's two fp32 moments (``exp_avg``, ``exp_avg_sq``) per trainable
    weight, no master copy (the weights are fp32 already), activations and logits of an fp32 step."""
    return {
        "weights (fp32)": (m.frozen + m.trainable) * 4,
        "gradients (fp32)": m.trainable * 4,
        "AdamW m, v (fp32)": m.trainable * 8,
        f"activations ({'checkpointed' if checkpointing else 'no checkpointing'}, fp32)": m.count.activations(checkpointing),
        "transient logits (fp32)": m.transient,
    }


def one_process_prediction(s1: dict, s2: dict, datasets: list[Dataset], weights: list[float], num_classes: int, llm_name: str,
                           padded_target: Optional[dict[str, int]] = None, lightning_checkpoint_io: bool = False) -> dict:
    """Bytes one fp32 process with plain AdamW holds at its peak in a stage-2 step of ``s2``'s batch
    over ``datasets`` (what ``benchmarks/smoke_real_dims.py`` compares its measured peak with):
    :func:`single_process_memory` of the measured step, plus the process itself; with
    ``lightning_checkpoint_io`` (a Trainer not built by our CLI), plus the in-memory copy Lightning's
    own checkpoint writer makes of a checkpoint (:func:`checkpoint_bytes`)."""
    batch = stage2_batch(s2, datasets, weights, llm_name, padded_target)
    m = measure_stage2(s1, s2, batch, num_classes, llm_name, torch.float32)
    checkpointing = bool(s2["model"]["init_args"]["language_model"].get("gradient_checkpointing"))
    parts = {**single_process_memory(m, checkpointing), "process (Python, torch, the libraries)": PROCESS_BASELINE}
    if lightning_checkpoint_io:
        parts["checkpoint save buffer (Lightning's TorchCheckpointIO)"] = checkpoint_bytes(m)
    return parts


def checkpoint_bytes(m: Stage2Measure) -> float:
    """Bytes of a stage-2 checkpoint: every weight but the frozen base LM in fp32, and AdamW's two
    moments of the trained ones. Lightning's ``TorchCheckpointIO`` serialises a checkpoint into
    memory before it writes the file (``_atomic_save``: a ``BytesIO``), so a save with it needs this
    much more host memory on rank 0; our CLI's ``AtomicCheckpointIO`` writes straight to a file."""
    return (m.vision_total + m.prompt + m.lm_trainable) * 4 + m.trainable * 8


def gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def human_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


@dataclass
class Figures:
    """What the tables are made of: the recipes, the per-GPU batch and the measured steps."""

    stage1_path: Path
    stage2_path: Path
    s1: dict
    s2: dict
    llm_name: str
    mfu: float
    gpu_counts: tuple[int, ...]
    weights: list[float]
    num_classes: int
    batch: Batch
    stage2: Stage2Measure  # the recipe's step: bf16 weights
    single: dict[str, Stage2Measure]  # per LM: the same step with fp32 weights (the one-process table)
    stage1: StepCount
    stage1_params: int
    stage1_trainable: int

    @property
    def model(self) -> dict:
        return self.s2["model"]["init_args"]

    @property
    def encoder(self) -> dict:
        return self.s1["model"]["init_args"]["encoder"]

    @property
    def checkpointing(self) -> bool:
        return bool(self.model["language_model"].get("gradient_checkpointing"))

    @property
    def vision_checkpointing(self) -> bool:
        return bool(self.encoder.get("grad_checkpointing"))

    @property
    def peak(self) -> float:
        return H100_BF16_DENSE * self.mfu

    @property
    def per_sample(self) -> float:
        return self.stage2.count.model_flops / self.batch.images

    @property
    def executed_per_sample(self) -> float:
        c = self.stage2.count
        return (c.forward + c.backward + (c.recompute if self.checkpointing else 0)) / self.batch.images

    @property
    def rate(self) -> float:
        """Samples/s per GPU at the MFU (model FLOPs, no recomputation)."""
        return self.peak / self.per_sample

    @property
    def step_time(self) -> float:
        return self.batch.images / self.rate

    @property
    def epoch_images(self) -> int:
        return sum(d.train_images for d in DATASETS)


def measure(stage1_path: Path, stage2_path: Path, mfu: float, gpu_counts: tuple[int, ...], llm: Optional[str] = None) -> Figures:
    """Read the recipes and measure the steps (the stage-2 LM: ``llm``, default the recipe's)."""
    s1, s2 = read_config(stage1_path), read_config(stage2_path)
    llm_name = llm or s2["model"]["init_args"]["language_model"]["name_or_path"]
    weights = list(s2["data"].get("weights") or [d.train_images for d in DATASETS])
    num_classes = 80 + 1000  # COCO's 80 + the VG converter's 1000-name vocabulary (upper bound: shared names merge)
    batch = stage2_batch(s2, DATASETS, weights, llm_name)
    stage2 = measure_stage2(s1, s2, batch, num_classes, llm_name)
    single = {}
    for name in dict.fromkeys([llm_name, SMALL_LLM]):
        single[name] = measure_stage2(s1, s2, stage2_batch(s2, DATASETS, weights, name), num_classes, name, torch.float32)
    s1_count, s1_params, s1_trainable = measure_stage1(s1, num_classes)
    return Figures(stage1_path, stage2_path, s1, s2, llm_name, mfu, gpu_counts, weights, num_classes, batch, stage2, single,
                   s1_count, s1_params, s1_trainable)


def tf(x: float) -> str:
    return f"{x / 1e12:.2f}"


def intro_section(f: Figures) -> list[str]:
    return ["# Scale plan: stage 2 (and stage 1) on H100s", "",
            f"Generated by `python benchmarks/plan.py --markdown` from `{shown(f.stage2_path)}` and `{shown(f.stage1_path)}`; the "
            "package's modules (`Stage2Module` with its `RegionCaptioner`, `Stage1Module`) built on the meta device, one training "
            "step run through the package's functions, FLOPs counted by `FlopCounterMode`, saved activations by "
            "`saved_tensors_hooks` (see the script's docstring). "
            f"Throughput at {f.mfu:.0%} MFU of an H100 SXM (bf16 dense peak {H100_BF16_DENSE / 1e12:.0f} TFLOP/s), perfect data-parallel scaling.", ""]


def model_section(f: Figures) -> list[str]:
    m, lm_cfg, config = f.stage2, f.model["language_model"], f.stage2.config
    lora = lm_cfg["lora"]
    tied = "tied input and output embeddings" if config.tie_word_embeddings else "untied embeddings"
    terms = " + ".join(f"{w:g} x `{name}`" for name, w in m.terms.items())
    return ["## The model", "",
            f"- LLM: `{f.llm_name}` from a hand-written config (`LLM_CONFIGS`), built by `AutoModelForCausalLM.from_config`: hidden "
            f"{config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
            f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV heads, vocab {config.vocab_size}, {tied}: "
            f"{(m.lm_total - m.lm_trainable) / 1e9:.2f} B parameters, frozen, plus {m.lm_trainable / 1e6:.1f} M LoRA weights that "
            f"train (peft, r {lora['r']}, alpha {lora['alpha']}, `{lora.get('target_modules')}`: every linear layer of the decoder, "
            f"not `lm_head`); bf16; gradient checkpointing {'on' if f.checkpointing else 'off'}.",
            f"- Vision (`RegionVisionModel`): `{f.encoder['backbone']}` at {f.s2['data']['image_size']} px, levels "
            f"{f.encoder.get('feature_levels')}, {m.vision_total / 1e6:.1f} M parameters, {m.vision_trainable / 1e6:.1f} M trained in "
            f"stage 2 (as `Stage2Module` leaves them: patch embedding + first {f.encoder.get('freeze_stages', 0)} stage(s) frozen"
            f"{', the whole encoder frozen (`freeze_encoder`)' if f.model.get('freeze_encoder') else ''}, category head "
            f"{'trained as `classification_weight` > 0' if f.model.get('classification_weight', 0) > 0 else 'frozen as `classification_weight` is 0'}, "
            f"attention map {'trained as `mask_loss_weight` > 0' if f.model.get('mask_loss_weight', 0) > 0 else 'frozen as `mask_loss_weight` is 0'}); "
            f"gradient checkpointing {'on' if f.vision_checkpointing else 'off'} (from the stage-1 encoder config).",
            f"- Region prompt (`RegionPrompt`, {f.model.get('prompt_mode', 'adaptive')}): {f.model['prompt_tokens']} + 1 soft tokens, "
            f"generator hidden {f.model['prompt_hidden']}, and the pair token of two-region questions: {m.prompt / 1e6:.1f} M parameters.",
            f"- Trainable in total: {m.trainable / 1e6:.0f} M; frozen: {m.frozen / 1e9:.2f} B.",
            f"- Loss of the step (the terms `RegionCaptioner.losses` computes for this recipe, weighted as `Stage2Module.losses`): "
            f"{terms}; the question call's second region slot is that region's prompt followed by the pair token.", ""]


def batch_section(f: Figures) -> list[str]:
    b = f.batch
    lines = ["## One per-GPU batch (stage 2)", "",
             f"{b.images} images per GPU (`data.batch_size`), sampled {' : '.join(f'{w:g}' for w in f.weights)} from "
             f"{' and '.join(d.name for d in DATASETS)} (`data.weights`), at most {b.max_regions} regions each:", "",
             "| LM call | sequences | padded length | tokens |", "|---|---|---|---|"]
    for task in ("caption", "referring", "question"):
        lines.append(f"| {task} | {b.rows[task]} | {b.lengths[task]} | {b.rows[task] * b.lengths[task]:,} |")
    lines += ["", f"{b.padded_tokens:,.0f} LM tokens per batch ({b.padded_tokens / b.images:.0f} per image), of which "
              f"{1 - b.real_tokens / b.padded_tokens:.0%} are padding: every call pads its targets to its longest "
              "(`RegionLanguageModel.tokenize_targets`), and a mixed batch pads VG's short phrases to RefCOCOg's long expressions.", ""]
    if b.packed:
        lines += [f"Packed (`language_model.packed_sequences: true`, `model/packing.py`): the calls' sequences share one forward in "
                  f"rows of {b.packed_tokens:,.0f} tokens in all ({b.packed_tokens / b.images:.0f} per image), "
                  f"{b.packed_padding:.1%} padding; the LM head runs on the target tokens only, in chunks of "
                  f"{DEFAULT_CHUNK} (`model/chunked_loss.py`). The FLOPs and memory below are of this packed step.", ""]
    return lines


def flops_section(f: Figures) -> list[str]:
    c, images = f.stage2.count, f.batch.images
    return ["## FLOPs per sample (one image with all its regions)", "",
            "| part | forward TFLOP per sample | share |", "|---|---|---|",
            f"| vision (Swin + masks + pooling + attention map) | {tf(c.parts['vision'] / images)} | {c.parts['vision'] / c.forward:.1%} |",
            f"| region prompt (and pair token) | {tf(c.parts['prompt'] / images)} | {c.parts['prompt'] / c.forward:.1%} |",
            f"| LLM with LoRA | {tf(c.parts['llm'] / images)} | {c.parts['llm'] / c.forward:.1%} |",
            (f"| `lm_head` (target positions only, in chunks, after the LLM's forward) | {tf(c.parts['lm_head'] / images)} | {c.parts['lm_head'] / c.forward:.1%} |"
             if f.batch.packed else
             f"| of which `lm_head` (every position, full vocabulary) | {tf(c.parts['lm_head'] / images)} | {c.parts['lm_head'] / c.forward:.1%} |"),
            "", "| step | TFLOP per sample | x forward |", "|---|---|---|",
            f"| forward | {tf(c.forward / images)} | 1.00 |",
            f"| backward (counted) | {tf(c.backward / images)} | {c.backward / c.forward:.2f} |",
            f"| model FLOPs = forward + backward (MFU counts these) | {tf(f.per_sample)} | {c.model_flops / c.forward:.2f} |",
            f"| recomputed forward (gradient checkpointing) | {tf(c.recompute / images)} | {c.recompute / c.forward:.2f} |",
            f"| executed FLOPs | {tf(f.executed_per_sample)} | {f.executed_per_sample * images / c.forward:.2f} |", "",
            f"Full fine-tuning would need ~3x forward (weight gradients of every matmul: another ~1x); with LoRA the frozen base "
            f"weights get none, so the backward is {c.backward / c.forward:.2f}x forward: input gradients through every "
            f"layer (~1x) plus LoRA's and the vision side's weight gradients. The vision side is trained (its backward "
            f"{'includes' if f.stage2.vision_trainable else 'skips'} weight gradients) but is "
            f"{c.parts['vision'] / c.forward:.1%} of the forward.", ""]


def zero_section(f: Figures) -> list[str]:
    m, c = f.stage2, f.stage2.count
    activations = c.activations(f.checkpointing)
    columns = list(zero_memory(3, 8, 0, 0, 0, 0, 0))
    header = "| ZeRO | GPUs | " + " | ".join(columns) + " | total GB | fits 80 GB |"
    lines = ["## Memory per GPU (stage 2, DeepSpeed, bf16 weights, fp32 optimizer state)", "", header, "|" + "---|" * (header.count("|") - 1)]
    for stage in (2, 3):
        for n in f.gpu_counts:
            mem = zero_memory(stage, n, m.frozen, m.trainable, activations, m.transient, m.layer_params)
            full = [mem.get(k, 0.0) for k in columns]
            total = sum(full) + CUDA_SLACK
            lines.append(f"| {stage} | {n} | " + " | ".join(gb(v) for v in full) + f" | {gb(total)} | {'yes' if total < H100_MEMORY else 'NO'} |")
    lines += ["", f"Totals add {gb(CUDA_SLACK)} GB for the CUDA context and allocator slack. Activations: {gb(c.activations(True))} GB with "
              f"checkpointing ({gb(c.saved_other)} GB saved outside checkpointed blocks, "
              + ("none of it logits (the packed step's chunked head keeps no logits for backward); " if f.batch.packed else
                 f"of which {gb(c.parts['log_softmax_bytes'])} GB are the fp32 log-softmax of the target logits (`text_loss` casts them to float); ")
              + f"{gb(c.block_inputs)} GB of block "
              f"inputs; {gb(c.block_saved_max)} GB for the one block being recomputed), {gb(c.activations(False))} GB without. "
              "Transient: the bf16 logits of the largest call (every position, the whole vocabulary) before the target span is cut out.", ""]
    base = sum(zero_memory(2, f.gpu_counts[0], m.frozen, m.trainable, 0.0, 0.0, m.layer_params).values()) + CUDA_SLACK
    per_image = (activations + m.transient) / f.batch.images
    lines += [f"With ZeRO-2 on {f.gpu_counts[0]} GPUs, {gb(base)} GB are not activations; activations and logits grow with the "
              f"batch ({gb(per_image)} GB per image), so ~{int((H100_MEMORY - base) / per_image)} images per GPU would fit: "
              f"the recipe's {f.batch.images} leave room for a larger batch (fewer, longer steps) or no recomputation of some layers.", ""]
    return lines


def single_process_section(f: Figures) -> list[str]:
    columns = list(single_process_memory(next(iter(f.single.values())), f.checkpointing))
    header = "| LLM | trainable | frozen | " + " | ".join(columns) + " | total GB | fits 80 GB |"
    lines = ["## Memory on one process (stage 2, fp32 weights, plain AdamW, no DeepSpeed)", "",
             f"The same step of the same batch, every module in fp32 (`precision: 32`, the LM loaded in float32), the "
             f"optimizer `configure_optimizers` builds (`torch.optim.AdamW`), one process on one GPU (no ZeRO, no sharding), "
             f"gradient checkpointing {'on' if f.checkpointing else 'off'} as the recipe:", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    for name, m in f.single.items():
        mem = list(single_process_memory(m, f.checkpointing).values())
        total = sum(mem) + CUDA_SLACK
        lines.append(f"| `{name}` | {m.trainable / 1e6:.0f} M | {m.frozen / 1e9:.2f} B | " + " | ".join(gb(v) for v in mem)
                     + f" | {gb(total)} | {'yes' if total < H100_MEMORY else 'NO'} |")
    lines += ["", f"Total = 4 bytes per weight (frozen and trainable) + 12 bytes per trainable weight (its fp32 gradient and AdamW's "
              f"`exp_avg`, `exp_avg_sq`; no master copy: the weights are fp32) + the fp32 step's activations (what autograd saves, "
              f"measured as above) + the fp32 logits of the largest call + {gb(CUDA_SLACK)} GB, an upper bound: the gradients are "
              "freed (`zero_grad(set_to_none=True)`) while the next forward builds its activations, and AdamW's foreach "
              "temporaries (about 4 bytes per trainable weight) come in the optimizer step, after the activations are freed.", "",
              "Host memory for saves: the trainers our CLI builds write a checkpoint straight to a temporary file "
              "(`AtomicCheckpointIO`); Lightning's own `TorchCheckpointIO` (a Trainer built elsewhere) serialises it into memory "
              "first (`_atomic_save`), so rank 0 then needs the checkpoint's size in host RAM on top of the process during each save: "
              + ", ".join(f"{gb(checkpoint_bytes(m))} GB for `{name}`" for name, m in f.single.items())
              + " (every weight but the frozen base LM in fp32, and AdamW's moments; measured on the CPU by "
              "`benchmarks/smoke_real_dims.py`, see docs/scaling.md).", ""]
    return lines


def throughput_section(f: Figures) -> list[str]:
    m, b = f.stage2, f.batch
    rate_hfu = f.peak / f.executed_per_sample
    lines = ["## Throughput and one epoch", "",
             f"Epoch = every training image once: {DATASETS[0].train_images:,} ({DATASETS[0].name}) + {DATASETS[1].train_images:,} "
             f"({DATASETS[1].name}) = {f.epoch_images:,} samples (the DataModule's epoch: the manifests' image counts; one sample = "
             f"one image with all its regions, at most `max_regions`). With `data.weights` 1:1 the epoch draws the two sets "
             f"equally, as the batch above.", "",
             f"At {f.mfu:.0%} MFU a GPU does {f.per_sample / 1e12:.2f} TFLOP of model FLOPs per sample: **{f.rate:.1f} samples/s per GPU** "
             f"({f.rate * b.lm_tokens / b.images:,.0f} LM tokens/s), a step of {b.images} images every {f.step_time:.2f} s. "
             f"If the {f.mfu:.0%} must cover the recomputed FLOPs as well (hardware FLOPs): {rate_hfu:.1f} samples/s.", ""]
    comm2 = 2 * m.trainable * 2  # reduce-scatter gradients + all-gather updated weights, bf16
    comm3 = 3 * (m.frozen + m.trainable) * 2 + m.trainable * 2  # all-gather weights in forward, recompute, backward; reduce-scatter gradients
    lines += ["| ZeRO | GPUs | samples/s | epoch | step compute | bytes moved per GPU per step | at the link's bandwidth |", "|---|---|---|---|---|---|---|"]
    for stage in (2, 3):
        for n in f.gpu_counts:
            moved = (comm2 if stage == 2 else comm3) * (n - 1) / n
            comm_time = moved / (NVLINK_BW if n <= 8 else INTERNODE_BW)
            lines.append(f"| {stage} | {n} | {f.rate * n:,.0f} | {human_time(f.epoch_images / (f.rate * n))} | {f.step_time * 1e3:.0f} ms | "
                         f"{gb(moved)} GB | {comm_time * 1e3:.0f} ms{' (exceeds the step)' if comm_time > f.step_time else ''} |")
    lines += ["", f"Communication is not in the samples/s (it overlaps with compute when it is shorter than the step). ZeRO-3 "
              f"gathers every weight, frozen ones included, for the forward, again for the recomputation and for the "
              f"backward: {gb(comm3)} GB per step; ZeRO-2 moves only the trainable weights' gradients and updates "
              f"({gb(comm2)} GB). Bandwidth assumed: {NVLINK_BW / 1e9:.0f} GB/s per GPU inside an 8-GPU NVLink node, "
              f"{INTERNODE_BW / 1e9:.0f} GB/s per GPU across nodes (one 400 Gb/s NIC per GPU). The frozen bf16 LLM "
              f"({gb(m.frozen * 2)} GB) fits on every GPU, so ZeRO-2 is the stage-2 choice; ZeRO-3 is for an LM that does not fit.", ""]
    return lines


def stage1_section(f: Figures) -> list[str]:
    c, data = f.stage1, f.s1["data"]
    images = int(data["batch_size"])
    model_flops = c.model_flops / images
    executed = (c.executed_flops if f.vision_checkpointing else c.model_flops) / images
    rate = f.peak / model_flops
    workers = int(data.get("num_workers") or 1)
    lines = ["## Stage 1 (Swin alone, DDP)", "",
             f"`Stage1Module` with `{f.encoder['backbone']}` at {data['image_size']} px, batch {images}, {data['max_regions']} regions: "
             f"forward {c.forward / images / 1e9:.0f} GFLOP per image, backward {c.backward / c.forward:.2f}x forward (the frozen "
             f"first stage has no weight gradients), model FLOPs {model_flops / 1e9:.0f} GFLOP, executed with recomputation "
             f"{executed / 1e9:.0f} GFLOP. {f.stage1_params / 1e6:.1f} M parameters ({f.stage1_trainable / 1e6:.1f} M trained); "
             f"activations per GPU {gb(c.activations(f.vision_checkpointing))} GB with checkpointing.", "",
             f"| GPUs | samples/s at {f.mfu:.0%} MFU | epoch | epoch if input-bound ({workers} workers x {DECODE_RATE[0]}-{DECODE_RATE[1]} images/s per GPU) |",
             "|---|---|---|---|"]
    for n in f.gpu_counts:
        slow, fast = (f.epoch_images / (n * workers * r) for r in DECODE_RATE)
        lines.append(f"| {n} | {rate * n:,.0f} | {human_time(f.epoch_images / (rate * n))} | {human_time(fast)} - {human_time(slow)} |")
    lines += ["", f"At {rate:,.0f} images/s per GPU stage 1 is input-bound, not compute-bound: decoding a COCO-size JPEG "
              f"(640x480) and letterboxing it to {data['image_size']} px (`to_region_sample`) took 14-27 ms on one core of this "
              f"project's (loaded) CPU, i.e. roughly {DECODE_RATE[0]}-{DECODE_RATE[1]} images/s per dataloader worker, so `num_workers: "
              f"{workers}` gives {workers * DECODE_RATE[0]}-{workers * DECODE_RATE[1]} images/s per GPU. GPU decoding (nvJPEG/DALI) or "
              f"pre-resized shards (`--max-side`) are what would feed it; stage 2 needs only {f.rate:.0f} images/s per GPU.", ""]
    return lines


def assumptions_section(f: Figures) -> list[str]:
    b = f.batch
    bos = "a BOS first" if LLM_CONFIGS[f.llm_name]["bos_token"] else "no BOS (Qwen2.5 has none)"
    lines = ["## Assumptions", ""]
    for d in DATASETS:
        lines.append(f"- {d.name}: {d.source}; {min(d.regions_per_image, b.max_regions):.2f} regions per sample used "
                     f"(at most `max_regions` {b.max_regions}); caption target {d.caption_tokens:.1f} tokens with EOS"
                     f"{'; its expressions are also the referring targets' if d.referring else '; no referring expressions'}; "
                     f"{d.questions_per_image:g} spatial questions per sample.")
    lines += [
        f"- Text lengths: {TOKENS_PER_WORD} Qwen tokens per English word; templates counted as words and punctuation "
        f"marks (the step tokenizes them with a word-level tokenizer that counts the same way: the model's own cannot be "
        f"downloaded here); {bos}; targets padded per call to {PADDED_TARGET['caption']} tokens (captions, "
        f"referring expressions: the longest RefCOCOg expression among ~8 in a batch) and {PADDED_TARGET['question']} (answers).",
        "- VG spatial questions: ~21 relationships per image, about half matched to two regions by the converter, and both "
        "regions must be among the 20 sampled of ~50 (about 1 in 6): 2 per sample.",
        "- VG region phrases have no referring expressions (the converter writes `referring: []`); RefCOCOg has no spatial questions.",
        f"- Categories: {f.num_classes} (COCO's 80 + VG's 1000-name vocabulary); only the frozen head's size depends on it.",
        "- Meta tensors have no values, so the step cannot pick regions by their validity: every image's "
        f"{b.max_regions} slots go through the vision side (as in the real step, padding included) and all of them get a "
        "prompt (the real step prompts only the valid regions: a few GFLOP more here), the LM calls take the counted rows, and "
        "the consistency loss pairs every two slots of an image (an upper bound; it has no matmul). The LM runs with eager "
        "attention (sdpa's mask check reads values): the same attention FLOPs, but it also saves the softmax probabilities "
        "(rows x heads x length^2 per layer, about 20 MB per layer of the 7B caption call), which sdpa's flash kernel recomputes in backward.",
        "- DeepSpeed bf16: every weight bf16 on the GPU, fp32 master weights, fp32 gradient partitions and Adam moments "
        "(16 bytes per trainable parameter, partitioned over the GPUs) + the bf16 working copy; frozen weights bf16 only.",
        f"- Activations are what autograd saves, in bf16 (fp32 where the code casts: the log-softmax of the logits); "
        f"temporaries inside an op and the allocator's fragmentation are not counted beyond the {gb(CUDA_SLACK)} GB margin.",
        f"- {f.mfu:.0%} MFU counts model FLOPs (forward + the backward autograd runs), the PaLM convention; perfect "
        "data-parallel scaling, communication overlapped (see the bandwidth column); the input pipeline keeps up (true for "
        "stage 2, not for stage 1: see above). 40% is plausible for the LLM's large matmuls; Swin's windowed attention and "
        "many small ops usually reach less.",
    ]
    return lines


def render(f: Figures) -> str:
    sections = (intro_section, model_section, batch_section, flops_section, zero_section, single_process_section,
                throughput_section, stage1_section, assumptions_section)
    return "\n".join(line for section in sections for line in section(f)).rstrip("\n") + "\n"


def plan(stage1_path: Path, stage2_path: Path, mfu: float, gpu_counts: tuple[int, ...], llm: Optional[str] = None) -> str:
    """The plan's markdown for the two recipes (the stage-2 LM: ``llm``, default the recipe's)."""
    return render(measure(stage1_path, stage2_path, mfu, gpu_counts, llm))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", type=Path, default=ROOT / "configs" / "stage1.yaml")
    parser.add_argument("--stage2", type=Path, default=ROOT / "configs" / "stage2.yaml")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation (default: %(default)s)")
    parser.add_argument("--gpus", type=int, nargs="+", default=list(GPU_COUNTS))
    parser.add_argument("--llm", choices=sorted(LLM_CONFIGS), help="plan this LM in place of the stage-2 recipe's")
    parser.add_argument("--markdown", nargs="?", const=ROOT / "docs" / "plan.md", type=Path, metavar="PATH",
                        help="also write the tables to PATH (default docs/plan.md)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = plan(args.stage1, args.stage2, args.mfu, tuple(args.gpus), args.llm)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
