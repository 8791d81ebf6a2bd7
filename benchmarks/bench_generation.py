"""Captions for all regions of an image in one batched ``generate`` against one call per region.

``RegionLanguageModel.generate(prompts)`` takes the soft prompts of every region at once (every
prompt has the same length, so nothing is padded) and decodes them together; the baseline calls
it once per region. Both decode greedily with the KV cache, ``max_new_tokens`` 16 (the stage-2
default), through the same peft LoRA model (``all-linear``, r 8, as the quickstart).

Prompts: 32 regions of one image, ``k + 1 = 5`` soft tokens each (the quickstart's
``prompt_tokens: 4`` plus the region token), drawn at the scale of the LM's input embeddings
(``RegionPrompt`` produces them at that scale); the caption template around them is the default.

Generated tokens are counted from the token ids ``generate`` returns: each sequence up to and
including its first EOS (or ``max_new_tokens``); the padding a finished sequence gets while the
batch runs on is not counted. Tokens per second = those tokens / wall time.

Two language models, both built in a temporary folder and loaded with ``from_pretrained``:

- the quickstart's tiny Llama (hidden 128, 2 layers, 4 heads; word-level tokenizer), pretrained
  briefly on the synthetic benchmark's sentences so it ends its captions with EOS;
- a larger Llama config (hidden 512, 4 layers, 8 heads, intermediate 1024), random weights:
  it rarely emits EOS, so every sequence runs to ``max_new_tokens``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import median, median_ratio, row, time_interleaved  # noqa: E402
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings, RegionLanguageModel  # noqa: E402
from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts  # noqa: E402

try:  # transformers' loading progress bars would clutter the runner's output
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

TARGET = 8.0


class TokenCounter:
    """Wraps ``model.generate`` to count the tokens each call generated (up to and including EOS)."""

    def __init__(self, language: RegionLanguageModel):
        self.tokens = 0
        self.eos = language.tokenizer.eos_token_id
        self._generate = language.model.generate
        language.model.generate = self  # an instance attribute: RegionLanguageModel.generate calls it

    def __call__(self, *args, **kwargs):
        out = self._generate(*args, **kwargs)
        ids = out.sequences if hasattr(out, "sequences") else out
        is_eos = ids == self.eos
        has_eos = is_eos.any(dim=1)
        first = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, torch.full_like(has_eos, ids.shape[1], dtype=torch.long))
        self.tokens += int(first.sum())
        return out


def measure(language: RegionLanguageModel, regions: int, prompt_len: int, max_new_tokens: int, rounds: int, label: str, sizes: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randn(regions, prompt_len, language.hidden_size, generator=generator) * language.embedding_rms()
    counter = TokenCounter(language)
    language.eval()

    def batched():
        return language.generate(prompts, max_new_tokens)

    def separate():
        return [c for i in range(regions) for c in language.generate(prompts[i : i + 1], max_new_tokens)]

    # token counts: one untimed call each (greedy decoding: the same in every round)
    counter.tokens = 0
    batched_captions = batched()
    batched_tokens = counter.tokens
    counter.tokens = 0
    separate_captions = separate()
    separate_tokens = counter.tokens
    same = sum(a == b for a, b in zip(batched_captions, separate_captions))
    times = time_interleaved({"batched": batched, "separate": separate}, rounds=rounds, warmup=0)
    speedup = median_ratio(times["separate"], times["batched"])
    batched_rate = median([batched_tokens / t for t in times["batched"]])
    separate_rate = median([separate_tokens / t for t in times["separate"]])
    note = (f"{sizes}; {regions} regions of one image, {prompt_len} soft tokens each, greedy, max_new_tokens {max_new_tokens}, "
            f"median of {rounds} interleaved rounds: one batched generate {median(times['batched']) * 1e3:.0f} ms, "
            f"{batched_tokens} tokens, {batched_rate:,.0f} tokens/s; {regions} separate calls {median(times['separate']) * 1e3:.0f} ms, "
            f"{separate_tokens} tokens, {separate_rate:,.0f} tokens/s; {same} of {regions} captions identical both ways")
    if speedup < TARGET:
        per_call = median_ratio(times["batched"], [t / regions for t in times["separate"]])
        note += (f". Unmet: the one call with {regions} rows takes {per_call:.1f}x the time of a 1-row call (median of "
                 f"per-round ratios, 1-row time = separate time / {regions}), so batching saves {regions}/{per_call:.1f}; the "
                 f"rows' compute, not the per-call overhead, is what limits it at this size")
    return row("generation", f"batched / per-region generate speed-up, {label}", speedup, f">= {TARGET:g}x", speedup >= TARGET, note)


def load(path: Path) -> RegionLanguageModel:
    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    return RegionLanguageModel(LanguageModelConfig(name_or_path=str(path), lora=lora))


def run(quick: bool = False) -> list[dict]:
    regions = 4 if quick else 32
    rounds = 2 if quick else 7
    max_new_tokens = 4 if quick else 16
    prompt_len = 5
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        texts = synthetic_pretraining_texts(0, 100 if quick else 300)
        torch.manual_seed(0)
        tiny = build_tiny_lm(Path(tmp) / "tiny", texts, hidden_size=32 if quick else 128, num_layers=1 if quick else 2,
                             num_heads=2 if quick else 4, steps=5 if quick else 150, progress=False)
        sizes = "tiny Llama " + ("hidden 32, 1 layer" if quick else "hidden 128, 2 layers, 4 heads, pretrained 150 steps")
        rows.append(measure(load(tiny), regions, prompt_len, max_new_tokens, rounds, "tiny LM (quickstart)", sizes))
        hidden, layers, heads = (64, 2, 4) if quick else (512, 4, 8)
        larger = build_tiny_lm(Path(tmp) / "larger", texts, hidden_size=hidden, num_layers=layers, num_heads=heads, steps=0, progress=False)
        sizes = f"Llama hidden {hidden}, {layers} layers, {heads} heads, intermediate {2 * hidden}, random init"
        rows.append(measure(load(larger), regions, prompt_len, max_new_tokens, rounds, f"Llama {hidden}x{layers} (random init)", sizes))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
