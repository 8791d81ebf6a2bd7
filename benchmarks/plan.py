"""Scale plan: FLOPs per sample, memory per GPU and epoch time of the real-scale recipes on H100s.

    python benchmarks/plan.py               # prints the tables and their assumptions
    python benchmarks/plan.py --markdown    # also writes docs/plan.md

Nothing here is timed: the models of ``configs/stage2.yaml`` (and ``configs/stage1.yaml``) are built
on the ``meta`` device (shapes, no weights, no memory) and run once:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around one training step of one per-GPU
  batch (forward, then ``backward``). It counts matmuls, convolutions and attention (2 FLOPs per
  multiply-add), not element-wise ops. The backward is counted, not assumed: autograd computes
  only the gradients something needs, so frozen weights (the LM's base weights under LoRA, the
  Swin's frozen first stage) get no weight-gradient matmuls, and the LM's backward is about 1x
  its forward (input gradients, plus the small LoRA weight gradients) instead of the 2x of full
  fine-tuning. Gradient checkpointing recomputes the forward of every checkpointed block that has
  something to train (the LM's decoder layers, the trainable Swin stages): counted separately,
  from the per-module forward counts.
- Activation memory: ``torch.autograd.graph.saved_tensors_hooks`` over the same step records every
  tensor autograd saves for backward (parameters excluded; views counted once, at their base's
  size), attributed to the checkpointed block it was saved in. With checkpointing a block keeps
  only its input, and one block's saved tensors exist at a time during backward, so activations
  = saved outside blocks + block inputs + the largest block's saved tensors.

The LLM is built from a hand-written config of the named model (the hub is not reachable here).
The data sizes (images, regions, text lengths) are stated with their sources or as assumptions.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM, bf16 dense (no sparsity)
H100_MEMORY = 80e9
DEFAULT_MFU = 0.40
GPU_COUNTS = (8, 32, 128)
NVLINK_BW = 350e9  # bytes/s per GPU a collective achieves inside an 8-GPU NVLink node (assumed)
INTERNODE_BW = 50e9  # bytes/s per GPU across nodes: one 400 Gb/s NIC per GPU (assumed)

# Hand-written configs of the models the recipes name (values from the models' config.json).
LLM_CONFIGS = {
    "Qwen/Qwen2.5-7B-Instruct": dict(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, bos_token=False,
    ),
}
LLM_CONFIGS["Qwen/Qwen2.5-7B"] = LLM_CONFIGS["Qwen/Qwen2.5-7B-Instruct"]


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


# ---------------------------------------------------------------------------- meta-device models


def build_llm(name: str, lora: dict, gradient_checkpointing: bool):
    """The LLM of the named config on the meta device, in bf16, with peft LoRA as ``load_language_model`` applies it."""
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    if name not in LLM_CONFIGS:
        raise SystemExit(f"plan.py: no hand-written config for {name!r}; add it to LLM_CONFIGS (known: {sorted(LLM_CONFIGS)})")
    spec = dict(LLM_CONFIGS[name])
    spec.pop("bos_token")
    family = spec.pop("family")
    config = {"qwen2": transformers.Qwen2Config}[family](**spec, max_position_embeddings=32768)
    with torch.device("meta"):
        model = {"qwen2": transformers.Qwen2ForCausalLM}[family](config)
    model = model.to(torch.bfloat16)
    if lora.get("enabled", True):
        settings = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                              target_modules=lora.get("target_modules"), task_type=TaskType.CAUSAL_LM)
        with torch.device("meta"):
            model = get_peft_model(model, settings)
        model = model.to(torch.bfloat16)  # DeepSpeed bf16 runs every weight in bf16 (fp32 master copies in the optimizer)
    return model, config


def build_vision(encoder: dict, num_classes: int, head_hidden: int, attn_dim: int, train_attention: bool, freeze_encoder: bool):
    from fineregion_pl.region_model import RegionVisionModel
    from fineregion_pl.vision import EncoderConfig

    fields = {k: v for k, v in encoder.items() if k in EncoderConfig.__dataclass_fields__}
    fields.update(pretrained=False, grad_checkpointing=False)  # checkpointing is modelled, not run
    with torch.device("meta"):
        vision = RegionVisionModel(EncoderConfig(**fields), num_classes, head_hidden, attn_dim)
    vision = vision.to(torch.bfloat16)
    vision.head.requires_grad_(False)  # as Stage2Module: the category head is stage 1's
    vision.attention.requires_grad_(train_attention)
    if freeze_encoder:
        vision.encoder.requires_grad_(False)
    return vision


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


def stage2_batch(s2: dict, datasets: list[Dataset], weights: list[float]) -> Batch:
    model = s2["model"]["init_args"]
    lm = model["language_model"]
    data = s2["data"]
    images, max_regions, k = int(data["batch_size"]), int(data["max_regions"]), int(model["prompt_tokens"]) + 1
    share = [w / sum(weights) for w in weights]
    regions = [images * s * min(d.regions_per_image, max_regions) for d, s in zip(datasets, share)]
    referring_rows = sum(r for r, d in zip(regions, datasets) if d.referring) if model.get("referring_weight", 0) > 0 else 0
    question_rows = sum(images * s * d.questions_per_image for d, s in zip(datasets, share)) if model.get("spatial_weight", 0) > 0 else 0
    bos = 1 if LLM_CONFIGS[lm["name_or_path"]]["bos_token"] else 0
    caption_ctx = sum(template_pieces(lm["caption_template"])) + k + bos
    referring_ctx = sum(template_pieces(lm["referring_template"])) + k + bos
    question_ctx = sum(template_pieces(lm["question_template"])) + 2 * k + bos
    rows = {"caption": round(sum(regions)), "referring": round(referring_rows), "question": round(question_rows)}
    lengths = {"caption": caption_ctx + PADDED_TARGET["caption"], "referring": referring_ctx + PADDED_TARGET["referring"],
               "question": question_ctx + PADDED_TARGET["question"]}
    real = sum(r * (caption_ctx + d.caption_tokens) for r, d in zip(regions, datasets))
    real += referring_rows * (referring_ctx + datasets[0].caption_tokens) + question_rows * (question_ctx + ANSWER_TOKENS)
    padded = sum(rows[t] * lengths[t] for t in rows)
    return Batch(images, max_regions, rows, lengths, real, padded)


def measure_stage2(s1: dict, s2: dict, batch: Batch, num_classes: int):
    from fineregion_pl.prompts import GEOMETRY_DIM, RegionPrompt
    from fineregion_pl.losses import mask_loss

    model = s2["model"]["init_args"]
    lm_cfg = model["language_model"]
    enc = s1["model"]["init_args"]
    vision = build_vision(enc["encoder"], num_classes, enc.get("head_hidden", 256), enc.get("attn_dim", 64),
                          train_attention=model.get("mask_loss_weight", 0) > 0, freeze_encoder=model.get("freeze_encoder", False))
    llm, config = build_llm(lm_cfg["name_or_path"], lm_cfg["lora"], lm_cfg.get("gradient_checkpointing", False))
    hidden, vocab = config.hidden_size, config.vocab_size
    with torch.device("meta"):
        prompt = RegionPrompt(vision.out_dim, hidden, int(model["prompt_tokens"]), model.get("prompt_mode", "adaptive"), int(model["prompt_hidden"]))
    prompt = prompt.to(torch.bfloat16)
    size = int(s2["data"]["image_size"])
    meta = dict(device="meta", dtype=torch.bfloat16)
    embed = llm.get_input_embeddings()
    k = prompt.length
    pieces = {t: template_pieces(lm_cfg[f"{t}_template"]) for t in ("caption", "referring", "question")}

    def text_call(prompts: list[torch.Tensor], task: str) -> torch.Tensor:
        """``RegionLanguageModel.text_loss``: template + prompts + target ids through the LM, CE on the target span."""
        rows = prompts[0].shape[0]
        parts = []
        for i, n in enumerate(pieces[task]):
            if n:
                parts.append(embed(torch.zeros(rows, n, dtype=torch.long, device="meta")))
            if i < len(prompts):
                parts.append(prompts[i])
        target = PADDED_TARGET[task]
        parts.append(embed(torch.zeros(rows, target, dtype=torch.long, device="meta")))
        embeds = torch.cat(parts, dim=1)
        out = llm(inputs_embeds=embeds, output_hidden_states=True)  # all-ones mask: None (meta tensors have no values to test)
        start = embeds.shape[1] - target - 1
        logits = out.logits[:, start:start + target]
        targets = torch.zeros(rows, target, dtype=torch.long, device="meta")
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def step() -> torch.Tensor:
        b, n = batch.images, batch.max_regions
        images = torch.empty(b, 3, size, size, **meta)
        boxes = torch.empty(b, n, 4, **meta)
        valid = torch.ones(b, n, dtype=torch.bool, device="meta")
        from fineregion_pl.masking import DynamicMasking

        out = vision(images, boxes, valid, model.get("masking", "dynamic"), DynamicMasking(**(model.get("dynamic") or {})))
        rows = batch.rows["caption"]
        z = out.regions.z.flatten(0, 1)[:rows]  # the valid regions (fewer than B x N: RefCOCOg images have ~2)
        context = out.regions.context.repeat_interleave(n, dim=0)[:rows]
        geometry = torch.empty(rows, GEOMETRY_DIM, **meta)
        prompts = prompt(z, context, geometry)
        loss = model.get("caption_weight", 1.0) * text_call([prompts], "caption")
        if batch.rows["referring"]:
            loss = loss + model["referring_weight"] * text_call([prompts[: batch.rows["referring"]]], "referring")
        if batch.rows["question"]:
            q = batch.rows["question"]
            loss = loss + model["spatial_weight"] * text_call([prompts[:q], prompts[q: 2 * q]], "question")
        if model.get("mask_loss_weight", 0) > 0:
            loss = loss + model["mask_loss_weight"] * mask_loss(out.attn_logits, out.target_masks, out.region_valid)
        return loss

    vision.train()
    llm.train()
    prompt.train()
    parts = {"vision": r"RegionVisionModel", "prompt": r"RegionPrompt", "llm": r"PeftModelForCausalLM|Qwen2ForCausalLM",
             "lm_head": r".*\.lm_head"}
    blocks = r"(\.layers_\d+\.blocks\.\d+|\.layers\.\d+)$"
    count = measure_step([vision, prompt, llm], step, blocks, parts)
    lm_params = dict(total=sum(p.numel() for p in llm.parameters()), trainable=sum(p.numel() for p in llm.parameters() if p.requires_grad))
    other = dict(
        vision_total=sum(p.numel() for p in vision.parameters()), vision_trainable=sum(p.numel() for p in vision.parameters() if p.requires_grad),
        prompt=sum(p.numel() for p in prompt.parameters()),
    )
    largest_logits = max(batch.rows[t] * batch.lengths[t] for t in batch.rows) * vocab * 2  # bf16 logits of the biggest call
    count.parts["log_softmax_bytes"] = sum(batch.rows[t] * PADDED_TARGET[t] for t in batch.rows) * vocab * 4  # fp32, saved by cross_entropy
    layer_params = sum(p.numel() for p in llm.get_base_model().model.layers[0].parameters())
    return count, lm_params, other, config, largest_logits, layer_params


def measure_stage1(s1: dict, num_classes: int) -> tuple[StepCount, int, int]:
    from fineregion_pl.losses import mask_loss
    from fineregion_pl.masking import DynamicMasking

    m = s1["model"]["init_args"]
    vision = build_vision(m["encoder"], num_classes, m.get("head_hidden", 256), m.get("attn_dim", 64), True, False)
    vision.head.requires_grad_(True)
    b, n, size = int(s1["data"]["batch_size"]), int(s1["data"]["max_regions"]), int(s1["data"]["image_size"])
    meta = dict(device="meta", dtype=torch.bfloat16)

    def step():
        out = vision(torch.empty(b, 3, size, size, **meta), torch.empty(b, n, 4, **meta), torch.ones(b, n, dtype=torch.bool, device="meta"),
                     m.get("masking", "dynamic"), DynamicMasking(**(m.get("dynamic") or {})))
        cls = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), torch.zeros(b * n, dtype=torch.long, device="meta"))
        return cls + m.get("mask_loss_weight", 1.0) * mask_loss(out.attn_logits, out.target_masks, out.region_valid)

    vision.train()
    count = measure_step([vision], step, r"\.layers_\d+\.blocks\.\d+$", {"vision": r"RegionVisionModel"})
    return count, sum(p.numel() for p in vision.parameters()), sum(p.numel() for p in vision.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- memory and the table


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


def gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def human_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan(stage1_path: Path, stage2_path: Path, mfu: float, gpu_counts: tuple[int, ...]) -> str:
    s1, s2 = read_config(stage1_path), read_config(stage2_path)
    weights = list(s2["data"].get("weights") or [d.train_images for d in DATASETS])
    num_classes = 80 + 1000  # COCO's 80 + the VG converter's 1000-name vocabulary (upper bound: shared names merge)
    batch = stage2_batch(s2, DATASETS, weights)
    count, lm_params, other, config, transient, layer_params = measure_stage2(s1, s2, batch, num_classes)
    s1_count, s1_params, s1_trainable = measure_stage1(s1, num_classes)
    model = s2["model"]["init_args"]
    lm_cfg = model["language_model"]
    checkpointing = bool(lm_cfg.get("gradient_checkpointing"))
    vision_ckpt = bool(s1["model"]["init_args"]["encoder"].get("grad_checkpointing"))
    peak = H100_BF16_DENSE * mfu
    per_sample = count.model_flops / batch.images
    executed_per_sample = (count.forward + count.backward + (count.recompute if checkpointing else 0)) / batch.images
    rate = peak / per_sample  # samples/s per GPU at the MFU (model FLOPs, no recomputation)
    rate_hfu = peak / executed_per_sample
    epoch_images = sum(d.train_images for d in DATASETS)
    step_time = batch.images / rate

    trainable = lm_params["trainable"] + other["vision_trainable"] + other["prompt"]
    frozen = lm_params["total"] - lm_params["trainable"] + other["vision_total"] - other["vision_trainable"]
    activations = count.activations(checkpointing)

    lines = ["# Scale plan: stage 2 (and stage 1) on H100s", ""]
    lines += [f"Generated by `python benchmarks/plan.py --markdown` from `{stage2_path.relative_to(ROOT) if stage2_path.is_relative_to(ROOT) else stage2_path}` "
              f"and `{stage1_path.relative_to(ROOT) if stage1_path.is_relative_to(ROOT) else stage1_path}`; models built on the meta device, "
              "FLOPs counted by `FlopCounterMode`, saved activations by `saved_tensors_hooks` (see the script's docstring). "
              f"Throughput at {mfu:.0%} MFU of an H100 SXM (bf16 dense peak {H100_BF16_DENSE / 1e12:.0f} TFLOP/s), perfect data-parallel scaling.", ""]

    lines += ["## The model", "",
              f"- LLM: `{lm_cfg['name_or_path']}` from a hand-written config: hidden {config.hidden_size}, intermediate "
              f"{config.intermediate_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
              f"{config.num_key_value_heads} KV heads, vocab {config.vocab_size}, untied embeddings: "
              f"{(lm_params['total'] - lm_params['trainable']) / 1e9:.2f} B parameters, frozen, plus "
              f"{lm_params['trainable'] / 1e6:.1f} M LoRA weights that train (r {lm_cfg['lora']['r']}, alpha {lm_cfg['lora']['alpha']}, "
              f"`{lm_cfg['lora'].get('target_modules')}`: every linear layer of the decoder, not `lm_head`); "
              f"bf16; gradient checkpointing {'on' if checkpointing else 'off'}.",
              f"- Vision: `{s1['model']['init_args']['encoder']['backbone']}` at {s2['data']['image_size']} px, levels "
              f"{s1['model']['init_args']['encoder'].get('feature_levels')}, {other['vision_total'] / 1e6:.1f} M parameters, "
              f"{other['vision_trainable'] / 1e6:.1f} M trained in stage 2 (patch embedding + first {s1['model']['init_args']['encoder'].get('freeze_stages', 0)} "
              f"stage(s) frozen, category head frozen, attention map trained as `mask_loss_weight` > 0); gradient checkpointing "
              f"{'on' if vision_ckpt else 'off'} (from the stage-1 encoder config).",
              f"- Region prompt: {model['prompt_tokens']} + 1 soft tokens, generator hidden {model['prompt_hidden']}: {other['prompt'] / 1e6:.1f} M parameters.",
              f"- Trainable in total: {trainable / 1e6:.0f} M; frozen: {frozen / 1e9:.2f} B.", ""]

    lines += ["## One per-GPU batch (stage 2)", "",
              f"{batch.images} images per GPU (`data.batch_size`), sampled {' : '.join(f'{w:g}' for w in weights)} from "
              f"{' and '.join(d.name for d in DATASETS)} (`data.weights`), at most {batch.max_regions} regions each:", "",
              "| LM call | sequences | padded length | tokens |", "|---|---|---|---|"]
    for task in ("caption", "referring", "question"):
        lines.append(f"| {task} | {batch.rows[task]} | {batch.lengths[task]} | {batch.rows[task] * batch.lengths[task]:,} |")
    lines += ["", f"{batch.padded_tokens:,.0f} LM tokens per batch ({batch.padded_tokens / batch.images:.0f} per image), of which "
              f"{1 - batch.real_tokens / batch.padded_tokens:.0%} are padding: every call pads its targets to its longest "
              "(`RegionLanguageModel.tokenize_targets`), and a mixed batch pads VG's short phrases to RefCOCOg's long expressions.", ""]

    def tf(x: float) -> str:
        return f"{x / 1e12:.2f}"

    lm_fwd = count.parts["llm"]
    lines += ["## FLOPs per sample (one image with all its regions)", "",
              "| part | forward TFLOP per sample | share |", "|---|---|---|",
              f"| vision (Swin + masks + pooling + attention map) | {tf(count.parts['vision'] / batch.images)} | {count.parts['vision'] / count.forward:.1%} |",
              f"| region prompt | {tf(count.parts['prompt'] / batch.images)} | {count.parts['prompt'] / count.forward:.1%} |",
              f"| LLM with LoRA | {tf(lm_fwd / batch.images)} | {lm_fwd / count.forward:.1%} |",
              f"| of which `lm_head` (every position, full vocabulary) | {tf(count.parts['lm_head'] / batch.images)} | {count.parts['lm_head'] / count.forward:.1%} |",
              "", "| step | TFLOP per sample | x forward |", "|---|---|---|",
              f"| forward | {tf(count.forward / batch.images)} | 1.00 |",
              f"| backward (counted) | {tf(count.backward / batch.images)} | {count.backward / count.forward:.2f} |",
              f"| model FLOPs = forward + backward (MFU counts these) | {tf(per_sample)} | {count.model_flops / count.forward:.2f} |",
              f"| recomputed forward (gradient checkpointing) | {tf(count.recompute / batch.images)} | {count.recompute / count.forward:.2f} |",
              f"| executed FLOPs | {tf(executed_per_sample)} | {executed_per_sample * batch.images / count.forward:.2f} |", "",
              f"Full fine-tuning would need ~3x forward (weight gradients of every matmul: another ~1x); with LoRA the frozen base "
              f"weights get none, so the backward is {count.backward / count.forward:.2f}x forward: input gradients through every "
              f"layer (~1x) plus LoRA's and the vision side's weight gradients. The vision side is trained (its backward "
              f"{'includes' if other['vision_trainable'] else 'skips'} weight gradients) but is "
              f"{count.parts['vision'] / count.forward:.1%} of the forward.", ""]

    lines += ["## Memory per GPU (stage 2, DeepSpeed, bf16 weights, fp32 optimizer state)", ""]
    gpus_for_memory = gpu_counts
    header = "| ZeRO | GPUs | " + " | ".join(zero_memory(3, 8, 0, 0, 0, 0, 0).keys()) + " | total GB | fits 80 GB |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for stage in (2, 3):
        for n in gpus_for_memory:
            mem = zero_memory(stage, n, frozen, trainable, activations, transient, layer_params)
            full = {k: mem.get(k, 0.0) for k in zero_memory(3, 8, 0, 0, 0, 0, 0)}
            total = sum(full.values()) + 2e9
            lines.append(f"| {stage} | {n} | " + " | ".join(gb(v) for v in full.values()) + f" | {gb(total)} | {'yes' if total < H100_MEMORY else 'NO'} |")
    lines += ["", f"Totals add 2 GB for the CUDA context and allocator slack. Activations: {gb(count.activations(True))} GB with "
              f"checkpointing ({gb(count.saved_other)} GB saved outside checkpointed blocks, of which {gb(count.parts['log_softmax_bytes'])} GB "
              f"are the fp32 log-softmax of the target logits (`text_loss` casts them to float); {gb(count.block_inputs)} GB of block inputs; {gb(count.block_saved_max)} GB for the one block "
              f"being recomputed), {gb(count.activations(False))} GB without. Transient: the bf16 logits of the largest call "
              f"(every position, the whole vocabulary) before the target span is cut out.", ""]
    base = sum(zero_memory(2, gpu_counts[0], frozen, trainable, 0.0, 0.0, layer_params).values()) + 2e9
    per_image = (activations + transient) / batch.images
    lines += [f"With ZeRO-2 on {gpu_counts[0]} GPUs, {gb(base)} GB are not activations; activations and logits grow with the "
              f"batch ({gb(per_image)} GB per image), so ~{int((H100_MEMORY - base) / per_image)} images per GPU would fit: "
              f"the recipe's {batch.images} leave room for a larger batch (fewer, longer steps) or no recomputation of some layers.", ""]

    lines += ["## Throughput and one epoch", "",
              f"Epoch = every training image once: {DATASETS[0].train_images:,} ({DATASETS[0].name}) + {DATASETS[1].train_images:,} "
              f"({DATASETS[1].name}) = {epoch_images:,} samples (the DataModule's epoch: the manifests' image counts; one sample = "
              f"one image with all its regions, at most `max_regions`). With `data.weights` 1:1 the epoch draws the two sets "
              f"equally, as the batch above.", "",
              f"At {mfu:.0%} MFU a GPU does {per_sample / 1e12:.2f} TFLOP of model FLOPs per sample: **{rate:.1f} samples/s per GPU** "
              f"({rate * batch.padded_tokens / batch.images:,.0f} LM tokens/s), a step of {batch.images} images every {step_time:.2f} s. "
              f"If the 40% must cover the recomputed FLOPs as well (hardware FLOPs): {rate_hfu:.1f} samples/s.", ""]
    comm2 = 2 * trainable * 2  # reduce-scatter gradients + all-gather updated weights, bf16
    comm3 = 3 * (frozen + trainable) * 2 + trainable * 2  # all-gather weights in forward, recompute, backward; reduce-scatter gradients
    lines += ["| ZeRO | GPUs | samples/s | epoch | step compute | bytes moved per GPU per step | at the link's bandwidth |", "|---|---|---|---|---|---|---|"]
    for stage in (2, 3):
        for n in gpu_counts:
            moved = (comm2 if stage == 2 else comm3) * (n - 1) / n
            bandwidth = NVLINK_BW if n <= 8 else INTERNODE_BW
            comm_time = moved / bandwidth
            lines.append(f"| {stage} | {n} | {rate * n:,.0f} | {human_time(epoch_images / (rate * n))} | {step_time * 1e3:.0f} ms | "
                         f"{gb(moved)} GB | {comm_time * 1e3:.0f} ms{' (exceeds the step)' if comm_time > step_time else ''} |")
    lines += ["", f"Communication is not in the samples/s (it overlaps with compute when it is shorter than the step). ZeRO-3 "
              f"gathers every weight, frozen ones included, for the forward, again for the recomputation and for the "
              f"backward: {gb(comm3)} GB per step; ZeRO-2 moves only the trainable weights' gradients and updates "
              f"({gb(comm2)} GB). Bandwidth assumed: {NVLINK_BW / 1e9:.0f} GB/s per GPU inside an 8-GPU NVLink node, "
              f"{INTERNODE_BW / 1e9:.0f} GB/s per GPU across nodes (one 400 Gb/s NIC per GPU). The frozen bf16 LLM "
              f"({gb(frozen * 2)} GB) fits on every GPU, so ZeRO-2 is the stage-2 choice; ZeRO-3 is for an LM that does not fit.", ""]

    s1_b = int(s1["data"]["batch_size"])
    s1_model = s1_count.model_flops / s1_b
    s1_exec = (s1_count.executed_flops if vision_ckpt else s1_count.model_flops) / s1_b
    s1_rate = peak / s1_model
    s1_workers = int(s1["data"].get("num_workers") or 1)
    lines += ["## Stage 1 (Swin alone, DDP)", "",
              f"`{s1['model']['init_args']['encoder']['backbone']}` at {s1['data']['image_size']} px, batch {s1_b}, "
              f"{s1['data']['max_regions']} regions: forward {s1_count.forward / s1_b / 1e9:.0f} GFLOP per image, backward "
              f"{s1_count.backward / s1_count.forward:.2f}x forward (the frozen first stage has no weight gradients), model FLOPs "
              f"{s1_model / 1e9:.0f} GFLOP, executed with recomputation {s1_exec / 1e9:.0f} GFLOP. {s1_params / 1e6:.1f} M parameters "
              f"({s1_trainable / 1e6:.1f} M trained); activations per GPU {gb(s1_count.activations(vision_ckpt))} GB with checkpointing.", "",
              f"| GPUs | samples/s at {mfu:.0%} MFU | epoch | epoch if input-bound ({s1_workers} workers x {DECODE_RATE[0]}-{DECODE_RATE[1]} images/s per GPU) |",
              "|---|---|---|---|"]
    for n in gpu_counts:
        slow, fast = (epoch_images / (n * s1_workers * r) for r in DECODE_RATE)
        lines.append(f"| {n} | {s1_rate * n:,.0f} | {human_time(epoch_images / (s1_rate * n))} | {human_time(fast)} - {human_time(slow)} |")
    lines += ["", f"At {s1_rate:,.0f} images/s per GPU stage 1 is input-bound, not compute-bound: decoding a COCO-size JPEG "
              f"(640x480) and letterboxing it to {s1['data']['image_size']} px (`to_region_sample`) took 14-27 ms on one core of this "
              f"project's (loaded) CPU, i.e. roughly {DECODE_RATE[0]}-{DECODE_RATE[1]} images/s per dataloader worker, so `num_workers: "
              f"{s1_workers}` gives {s1_workers * DECODE_RATE[0]}-{s1_workers * DECODE_RATE[1]} images/s per GPU. GPU decoding (nvJPEG/DALI) or pre-resized "
              f"shards (`--max-side`) are what would feed it; stage 2 needs only {rate:.0f} images/s per GPU."]

    lines += ["", "## Assumptions", ""]
    for d in DATASETS:
        lines.append(f"- {d.name}: {d.source}; {min(d.regions_per_image, batch.max_regions):.2f} regions per sample used "
                     f"(at most `max_regions` {batch.max_regions}); caption target {d.caption_tokens:.1f} tokens with EOS"
                     f"{'; its expressions are also the referring targets' if d.referring else '; no referring expressions'}; "
                     f"{d.questions_per_image:g} spatial questions per sample.")
    lines += [
        f"- Text lengths: {TOKENS_PER_WORD} Qwen tokens per English word; templates counted as words and punctuation "
        f"marks; no BOS (Qwen2.5 has none); targets padded per call to {PADDED_TARGET['caption']} tokens (captions, "
        f"referring expressions: the longest RefCOCOg expression among ~8 in a batch) and {PADDED_TARGET['question']} (answers).",
        "- VG spatial questions: ~21 relationships per image, about half matched to two regions by the converter, and both "
        "regions must be among the 20 sampled of ~50 (about 1 in 6): 2 per sample.",
        "- VG region phrases have no referring expressions (the converter writes `referring: []`); RefCOCOg has no spatial questions.",
        f"- Categories: {num_classes} (COCO's 80 + VG's 1000-name vocabulary); only the frozen head's size depends on it.",
        "- DeepSpeed bf16: every weight bf16 on the GPU, fp32 master weights, fp32 gradient partitions and Adam moments "
        "(16 bytes per trainable parameter, partitioned over the GPUs) + the bf16 working copy; frozen weights bf16 only.",
        "- Activations are what autograd saves, in bf16 (fp32 where the code casts: the log-softmax of the logits); "
        "temporaries inside an op and the allocator's fragmentation are not counted beyond the 2 GB margin.",
        f"- {mfu:.0%} MFU counts model FLOPs (forward + the backward autograd runs), the PaLM convention; perfect "
        "data-parallel scaling, communication overlapped (see the bandwidth column); the input pipeline keeps up (true for "
        "stage 2, not for stage 1: see above). 40% is plausible for the LLM's large matmuls; Swin's windowed attention and "
        "many small ops usually reach less.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", type=Path, default=ROOT / "configs" / "stage1.yaml")
    parser.add_argument("--stage2", type=Path, default=ROOT / "configs" / "stage2.yaml")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation (default: %(default)s)")
    parser.add_argument("--gpus", type=int, nargs="+", default=list(GPU_COUNTS))
    parser.add_argument("--markdown", nargs="?", const=ROOT / "docs" / "plan.md", type=Path, metavar="PATH",
                        help="also write the tables to PATH (default docs/plan.md)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = plan(args.stage1, args.stage2, args.mfu, tuple(args.gpus))
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
