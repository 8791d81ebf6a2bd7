"""Packed LM sequences and target-only chunked logits give the padded, full-logits numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from fineregion_pl.model.chunked_loss import token_nll
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings, RegionLanguageModel
from fineregion_pl.model.packing import first_fit_decreasing, pack_layout, shared_context_layout
from fineregion_pl.train.tiny_lm import train_word_tokenizer

TEXTS = ["a small red circle", "a big blue square near the left edge of the image", "left", "a green triangle",
         "the large yellow star above the small red circle on the right", "above"]


def tiny_folder(tmp_path, family: str):
    tokenizer = train_word_tokenizer(TEXTS + [LanguageModelConfig().question_template.replace("{region}", "")])
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **special)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=False, **common))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, **special))
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    return str(tmp_path / family)


def language(folder: str, packed: bool, attention: str | None = None) -> RegionLanguageModel:
    torch.manual_seed(0)
    lm = RegionLanguageModel(LanguageModelConfig(name_or_path=folder, packed_sequences=packed, attn_implementation=attention, lora=LoraSettings(dropout=0.0)))
    for name, p in lm.named_parameters():  # LoRA B starts at 0: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return lm


def calls(d: int):
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randn(6, 3, d, generator=generator)
    second = torch.randn(2, 4, d, generator=generator)
    return [(prompts, TEXTS, "caption"), (prompts[[1, 4]], TEXTS[3:5], "referring"), ([prompts[[0, 2]], second], ["left", "above"], "question")]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_losses_equal_padded_losses(tmp_path, family):
    folder = tiny_folder(tmp_path, family)
    packed, padded = language(folder, True), language(folder, False)
    padded.load_state_dict(packed.state_dict())
    assert packed.packs and not padded.packs
    ours = packed.text_losses(calls(packed.hidden_size))
    reference = [padded.text_loss(*call) for call in calls(packed.hidden_size)]
    for (loss, rep), (ref_loss, ref_rep) in zip(ours, reference):
        assert abs(loss.item() - ref_loss.item()) < 1e-4
        torch.testing.assert_close(rep, ref_rep, atol=1e-4, rtol=0)
    sum(loss for loss, _ in ours).backward()
    sum(loss for loss, _ in reference).backward()
    grads = {n: p.grad for n, p in padded.named_parameters() if p.grad is not None}
    assert grads
    for name, p in packed.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        scores = packed.log_likelihoods(calls(packed.hidden_size))
        expected = [padded.log_likelihood(*call) for call in calls(packed.hidden_size)]
    for s, e in zip(scores, expected):
        torch.testing.assert_close(s, e, atol=1e-4, rtol=0)


def test_an_unsupported_family_takes_the_padded_path(tmp_path):
    lm = language(tiny_folder(tmp_path, "gpt2"), True)
    assert not lm.packs
    loss, rep = lm.text_loss(*calls(lm.hidden_size)[0])
    assert torch.isfinite(loss) and rep.shape == (6, lm.hidden_size)


def test_layout_restarts_positions_and_leaves_little_padding():
    texts = [[[5] * t for t in (3, 9, 1, 4, 7)], [[6] * 2, [6] * 8]]
    layout = pack_layout([4, 6], [5, 2], texts, torch.device("cpu"))
    assert layout.rows == 1 and layout.width == layout.real_tokens == 4 * 5 + 24 + 6 * 2 + 10  # one row, no filler
    assert layout.rows * layout.width >= layout.real_tokens
    assert layout.targets.numel() == 24 + 10 and set(layout.call.tolist()) == {0, 1}
    assert layout.position_ids[0, 0] == 0 and layout.position_ids.max() <= layout.width - 1
    assert first_fit_decreasing([5, 5, 3, 2, 9], 10) == [[4], [0, 1], [2, 3]]
    many = [[[1] * t for t in torch.randint(2, 21, (160,), generator=torch.Generator().manual_seed(0)).tolist()]]
    assert pack_layout([8], [160], many, torch.device("cpu")).padding_share < 0.05


def test_chunked_nll_equals_full_cross_entropy_and_its_gradient():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    targets = torch.randint(0, 50, (37,), generator=generator)
    ours = token_nll(hidden, head, targets, chunk=8)
    reference = F.cross_entropy(head(hidden), targets, reduction="none")
    torch.testing.assert_close(ours, reference)
    (ours.sum()).backward()
    g_ours, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    reference.sum().backward()
    torch.testing.assert_close(g_ours, hidden.grad)
    torch.testing.assert_close(g_head, head.weight.grad)


@pytest.mark.parametrize(("family", "attention"), [("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", None)])
def test_shared_context_scores_equal_one_sequence_per_text(tmp_path, family, attention):
    """Grounding's layout: each context once, its texts after it; the scores of the padded LM."""
    folder = tiny_folder(tmp_path, family)
    shared, padded = language(folder, True, attention).eval(), language(folder, False, attention).eval()  # gpt2 has dropout
    padded.load_state_dict(shared.state_dict())
    prompts = torch.randn(4, 3, shared.hidden_size, generator=torch.Generator().manual_seed(3))
    owners = [2, 0, 2, 2, 3, 0, 1, 3]  # context 1 has one text, the others several; out of order
    texts = [TEXTS[j % len(TEXTS)] for j in range(len(owners))]
    with torch.no_grad():
        ours = shared.log_likelihood_shared(prompts, texts, owners, "referring")
        reference = padded.log_likelihood(prompts[owners], texts, "referring")
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert len(shared.log_likelihood_shared(prompts, [], [], "referring")) == 0


def test_shared_context_layout_keeps_texts_apart():
    layout = shared_context_layout(3, [0, 1, 0], [[7, 8], [9], [5, 6, 4]], torch.device("cpu"))
    assert layout.real_tokens == 3 + 2 + 3 + 3 + 1
    allowed = (layout.attention_mask == 0)[:, 0]
    slots = layout.source.view(layout.rows, layout.width)
    text = {int(s): (r, k) for r in range(layout.rows) for k, s in enumerate(slots[r].tolist())}
    row, first_of_0 = text[6]  # sources: 2 contexts x 3 slots, then the texts' tokens from 6
    _, first_of_2 = text[9]
    assert allowed[row, first_of_2, first_of_2] and not allowed[row, first_of_2, first_of_0]  # text 2 does not see text 0
    assert allowed[row, first_of_2, first_of_0 - 1]  # it sees its context's last slot
    assert layout.position_ids[row, first_of_2] == layout.position_ids[row, first_of_0] == 3  # both continue the context
    assert layout.predict.numel() == layout.targets.numel() == 6 and layout.sequence.tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="2 owners but 3 texts"):
        shared_context_layout(3, [0, 1], [[1], [2], [3]], torch.device("cpu"))
