"""A small "pretrained" language model for the synthetic benchmark, made on the CPU in seconds.

A word-level tokenizer is trained on the benchmark's text with the ``tokenizers`` library, a
2-layer Llama is pretrained on that text, and both are saved with ``save_pretrained``, so stage 2
loads them through the same ``from_pretrained`` + LoRA path as a hub model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from fineregion_pl.train.optim import warmup_cosine

if TYPE_CHECKING:
    import transformers


def train_word_tokenizer(texts: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-case, whitespace and punctuation split) over ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


def tiny_model(family: str, tokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4):
    """A randomly initialised tiny LM of a family: ``llama`` (Llama/Qwen-style), ``gpt2`` or ``t5``."""
    import transformers

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vocab = len(tokenizer)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=128, tie_word_embeddings=True, **special,
        )
        return transformers.LlamaForCausalLM(config)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=128, **special)
        return transformers.GPT2LMHeadModel(config)
    if family == "t5":
        config = transformers.T5Config(
            vocab_size=vocab, d_model=hidden_size, d_kv=hidden_size // num_heads, d_ff=2 * hidden_size, num_layers=num_layers,
            num_heads=num_heads, decoder_start_token_id=tokenizer.pad_token_id, **special,
        )
        return transformers.T5ForConditionalGeneration(config)
    raise ValueError(f"unknown tiny LM family {family!r}: use llama, gpt2 or t5")


def build_tiny_lm(
    out_dir: Path,
    texts: Sequence[str],
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    family: str = "llama",
) -> Path:
    """Train a tokenizer and pretrain a tiny LM on ``texts``; save both to ``out_dir``.

    Causal families learn the texts as a language model; ``t5`` learns to write each text from
    an empty encoder input (its decoder becomes the language model).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = train_word_tokenizer(texts)
    threads = torch.get_num_threads()
    # the ops of a tiny LM are too small to gain from a second thread, and on a busy machine every
    # parallel region would wait for it: one thread is as fast when idle and far faster when shared
    torch.set_num_threads(1)
    try:
        model = _pretrain(family, tokenizer, texts, hidden_size, num_layers, num_heads, steps, batch_size, lr, rng, progress)
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _pretrain(family, tokenizer, texts, hidden_size, num_layers, num_heads, steps, batch_size, lr, rng, progress):
    """Pretrain a tiny LM of ``family`` on ``texts`` (the loop of :func:`build_tiny_lm`)."""
    from transformers import GenerationConfig

    model = tiny_model(family, tokenizer, hidden_size, num_layers, num_heads)
    encoder_decoder = model.config.is_encoder_decoder
    bos = [] if encoder_decoder else [tokenizer.bos_token_id]
    encoded = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, warmup_steps=max(1, steps // 10), total_steps=steps)
    model.train()
    bar = tqdm(range(steps), desc=f"tiny {family} pretraining", disable=not progress)
    for _ in bar:
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        length = max(len(s) for s in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        if encoder_decoder:
            source = torch.full((len(batch), 1), tokenizer.eos_token_id)
            loss = model(input_ids=source, labels=labels).loss
        else:
            loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id if encoder_decoder else None,
    )
    return model


def synthetic_pretraining_texts(seed: int = 0, count: int = 1000, scenes=None) -> list[str]:
    """Text to pretrain the tiny LM on: the benchmark's sentences, and each framed by the default
    task templates (with the region slots left out), so the LM knows every word it will see.
    ``scenes(seed, split, count)`` gives the scenes (default: the easy benchmark's)."""
    from fineregion_pl.data.synthetic import iter_scenes
    from fineregion_pl.model.language_model import LanguageModelConfig

    scenes = scenes or iter_scenes
    templates = LanguageModelConfig()
    frame = {
        name: " ".join(getattr(templates, f"{name}_template").replace("{region}", " ").split())
        for name in ("caption", "referring", "question")
    }
    texts = []
    for _, record in scenes(seed, "train", count):
        for region in record["regions"]:
            texts += region["captions"] + region["referring"]
            texts += [f"{frame['caption']} {c}" for c in region["captions"]]
            texts += [f"{frame['referring']} {r}" for r in region["referring"]]
        for question in record["questions"]:
            texts += [question["question"], f"{frame['question']} {question['answer']}"]
    return texts
