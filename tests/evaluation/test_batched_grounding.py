"""Batched grounding on the packed LM gives the per-expression loop's numbers on the padded LM."""

from __future__ import annotations

import pytest
import torch
from learning import first_batch

from fineregion_pl import RegionDataModule, Stage2Module
from fineregion_pl.evaluation.loops import answer_questions, ground_expressions, ground_expressions_one_by_one
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings


def module(stage1_checkpoint, tiny_lm, packed: bool) -> Stage2Module:
    lm = LanguageModelConfig(name_or_path=str(tiny_lm), packed_sequences=packed, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    out = Stage2Module(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32, max_new_tokens=6)
    out.setup("fit")
    out.configure_model()
    return out.eval()


@pytest.mark.slow
def test_batched_grounding_and_answers_equal_todays_loops(stage1_checkpoint, tiny_lm, synthetic_data):
    new, old = module(stage1_checkpoint, tiny_lm, True), module(stage1_checkpoint, tiny_lm, False)
    old.load_state_dict(new.state_dict())
    assert new.model.language.packs and not old.model.language.packs
    data = RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)
    batch = first_batch(data, "test")
    with torch.no_grad():
        encoded_new, encoded_old = new.model.encode(batch), old.model.encode(batch)
        ours, reference = ground_expressions(new.model, batch, encoded_new), ground_expressions_one_by_one(old.model, batch, encoded_old)
        assert len(ours) == len(reference) > 2
        assert ours == reference
        assert new.model.describe_batch(batch, encoded_new) == old.model.describe_batch(batch, encoded_old)
        assert answer_questions(new.model, batch, encoded_new) == answer_questions(old.model, batch, encoded_old)
        prompts = encoded_new.prompts
        texts = [batch["captions"][b][n] for b, n in encoded_new.index.tolist()]
        torch.testing.assert_close(new.model.score(prompts, texts, "caption"), old.model.score(prompts, texts, "caption"), atol=1e-4, rtol=0)
