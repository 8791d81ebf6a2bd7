"""Stage-2 LM step at Qwen2.5-0.5B's shape: today's padded, full-logits path against the packed one.

``RegionLanguageModel`` around a Qwen2 built from Qwen2.5-0.5B's config (hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864, vocab 151,936; random weights, built locally by
``benchmarks/plan.py``'s ``from_config_loader``, the same LoRA set-up as ``load_language_model``),
float32 on the CPU, with the recipe's ``attn_implementation`` (sdpa) and ``gradient_checkpointing`` (on):
checkpointing keeps only each layer's input for backward, so what is left of the step's memory is
what the two ways differ in (the logits). One step = the text calls ``RegionCaptioner.losses`` makes for a batch of the
real recipe's mix (``configs/stage2.yaml``: RefCOCOg umd + Visual Genome 1:1, at most
``max_regions`` regions, captions for every region, referring expressions for RefCOCOg's, two
spatial questions per VG image; target lengths drawn around ``plan.py``'s means), then backward.
Old: ``packed_sequences: false`` (one padded forward per call, full logits, fp32 log-softmax).
New: ``packed_sequences: true`` (one packed forward for all calls, LM head on target positions only,
chunked cross-entropy). The padding share is that of a whole per-GPU batch of the recipe
(``data.batch_size`` images); the timed step has 4 images. ``--quick``: 1 layer, vocab 32,000, 2 images.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from unittest import mock

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import median, median_ratio, peak_memory_bytes, row, time_interleaved  # noqa: E402
from benchmarks.plan import DATASETS, FILLER, LLM_CONFIGS, SMALL_LLM, from_config_loader, read_config  # noqa: E402
from fineregion_pl.model import language_model  # noqa: E402
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings  # noqa: E402
from fineregion_pl.model.packing import pack_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(packed: bool, layers: int, vocab: int = LLM_CONFIGS[SMALL_LLM]["vocab_size"]) -> language_model.RegionLanguageModel:
    """The LM of the stage-2 recipe's settings (its templates, LoRA, ``attn_implementation`` and
    ``gradient_checkpointing``), at Qwen2.5-0.5B's shape with ``layers`` layers."""
    s2 = read_config(ROOT / "configs" / "stage2.yaml")["model"]["init_args"]["language_model"]
    config = LanguageModelConfig(name_or_path=SMALL_LLM, caption_template=s2["caption_template"], referring_template=s2["referring_template"],
                                 question_template=s2["question_template"], packed_sequences=packed,
                                 attn_implementation=s2["attn_implementation"], gradient_checkpointing=s2["gradient_checkpointing"],
                                 lora=LoraSettings(**{**s2.get("lora", {}), "dropout": 0.0}))
    spec = dict(LLM_CONFIGS[SMALL_LLM], num_hidden_layers=layers, vocab_size=vocab)
    loader = from_config_loader(SMALL_LLM, torch.float32, config.attn_implementation, config.gradient_checkpointing)
    with mock.patch.dict(LLM_CONFIGS, {SMALL_LLM: spec}), mock.patch.object(language_model, "load_language_model", loader):
        torch.manual_seed(0)
        lm = language_model.RegionLanguageModel(config)
    return lm


def recipe_calls(images: int, hidden: int, prompt_tokens: int, max_regions: int, seed: int = 0) -> list[tuple]:
    """The ``(prompts, texts, task)`` calls of one batch of the recipe's mix (half RefCOCOg, half VG images)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    refcocog, vg = DATASETS
    lengths, referring, questions = [], [], 0
    for i in range(images):
        data = refcocog if i % 2 == 0 else vg
        regions = min(max_regions, max(1, round(rng.gauss(data.regions_per_image, 1))))
        for _ in range(regions):
            tokens = max(2, round(rng.uniform(0.4, 1.6) * data.caption_tokens))
            lengths.append(tokens)
            if data.referring:
                referring.append(max(2, round(rng.uniform(0.4, 1.6) * data.caption_tokens)))
        questions += round(data.questions_per_image)
    texts = lambda counts: [" ".join([FILLER] * (t - 1)) for t in counts]  # noqa: E731  (EOS is the last token)
    prompts = torch.randn(len(lengths), prompt_tokens, hidden, generator=generator) * 0.02
    calls = [(prompts.requires_grad_(True), texts(lengths), "caption")]
    if referring:
        calls.append((prompts[: len(referring)], texts(referring), "referring"))
    if questions:
        pair = torch.randn(questions, prompt_tokens + 1, hidden, generator=generator) * 0.02
        calls.append(([prompts[:questions], pair], texts([2] * questions), "question"))
    return calls


def step(lm, calls) -> float:
    lm.zero_grad(set_to_none=True)
    losses = lm.text_losses(calls)
    total = sum(loss for loss, _ in losses)
    total.backward()
    return float(total.detach())


def padding_shares(lm, calls) -> tuple[float, float]:
    """Padding share of LM tokens: padded (each call to its longest target) and packed."""
    context = [lm.context_embeddings(p, task).shape[1] for p, _, task in calls]
    ids = [[lm.tokenizer(t, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id] for t in texts] for _, texts, _ in calls]
    real = sum(c * len(i) + sum(len(s) for s in i) for c, i in zip(context, ids))
    padded = sum(len(i) * (c + max(len(s) for s in i)) for c, i in zip(context, ids))
    layout = pack_layout(context, [len(i) for i in ids], ids, torch.device("cpu"))
    return 1 - real / padded, layout.padding_share


def run(quick: bool = False) -> list[dict]:
    """Padding share, step-time and peak-memory ratios of the padded and the packed LM step."""
    layers, images, rounds = (1, 2, 1) if quick else (24, 4, 5)
    s2 = read_config(ROOT / "configs" / "stage2.yaml")
    k = int(s2["model"]["init_args"].get("prompt_tokens", 4)) + 1
    max_regions = int(s2["data"]["max_regions"])
    vocab = 32_000 if quick else LLM_CONFIGS[SMALL_LLM]["vocab_size"]
    old, new = build(False, layers, vocab), build(True, layers, vocab)
    new.load_state_dict(old.state_dict())
    calls = recipe_calls(images, new.hidden_size, k, max_regions)
    loss_old, loss_new = step(old, calls), step(new, calls)
    if abs(loss_old - loss_new) > 1e-3 * max(1.0, abs(loss_old)):
        raise AssertionError(f"bench_lm_step: packed loss {loss_new:.6f} differs from padded {loss_old:.6f}")
    batch = int(s2["data"]["batch_size"])
    share_old, share_new = padding_shares(new, recipe_calls(batch, new.hidden_size, k, max_regions, seed=1))
    times = time_interleaved({"old": lambda: step(old, calls), "new": lambda: step(new, calls)}, rounds=rounds)
    peak_old = peak_memory_bytes(lambda: step(old, calls))[0]
    peak_new = peak_memory_bytes(lambda: step(new, calls))[0]
    rows_ = [len(c[1]) for c in calls]
    settings = f"{old.config.attn_implementation} attention, gradient checkpointing {'on' if old.config.gradient_checkpointing else 'off'} (the recipe's)"
    sizes = (f"Qwen2.5-0.5B shape ({layers} of 24 layers), fp32 CPU, LoRA, {settings}; {images} images of the recipe's mix: "
             f"{' + '.join(f'{n} {c[2]}' for n, c in zip(rows_, calls))} sequences; losses {loss_old:.4f} (old) / {loss_new:.4f} (new)")
    speed = median_ratio(times["old"], times["new"])
    memory = peak_old / peak_new
    padded_tokens = sum(len(c[1]) * (old.context_embeddings(c[0], c[2]).shape[1] + max(len(t.split()) + 1 for t in c[1])) for c in calls)
    logits_bytes = padded_tokens * vocab * 4
    share_note = f"a batch of the recipe ({batch} images per GPU, `data.batch_size`): padded calls {share_old:.0%} padding, packed rows {share_new:.1%}"
    if share_new > 0.05:
        share_note += ". Unmet: the leftover ends of the packed rows; more sequences per step fill them better"
    time_note = f"{sizes}; old {median(times['old']) * 1e3:.0f} ms, new {median(times['new']) * 1e3:.0f} ms (median of {rounds} interleaved rounds)"
    if speed < 1.25:
        time_note += f". Unmet: the {layers} decoder layers' work is the same both ways; only padding and the head's logits are saved"
    memory_note = (f"{sizes}; peak bytes the CPU allocator handed out during one step (forward + backward): "
                   f"old {peak_old / 1e6:.0f} MB, new {peak_new / 1e6:.0f} MB; the padded calls' fp32 logits alone are {logits_bytes / 1e6:.0f} MB")
    if memory < 1.5:
        memory_note += (f". Unmet: with {layers} layer(s) and a vocab of {vocab:,} the logits are a smaller share of the step's memory "
                        "than at the full shape")
    return [
        row("lm_step", "padding share of LM tokens, packed (padded today)", max(share_new, 1e-6), "<= 0.05", share_new <= 0.05,
            f"{share_note}; timed below: {sizes}"),
        row("lm_step", "step time, padded full-logits / packed target-logits", speed, ">= 1.25x", speed >= 1.25, time_note),
        row("lm_step", "peak memory, padded full-logits / packed target-logits", memory, ">= 1.5x", memory >= 1.5, memory_note),
    ]

if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
