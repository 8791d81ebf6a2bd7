"""One-anchor vision questions ("what is left of the red square?"): from the hard shards through the
DataModule into a batch, the relation's template, the loss, the answers and their files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_trainer
from learning import LossRecorder, first_batch, fixed_batch_loader

from fineregion_pl import RegionDataModule, Stage2Module
from fineregion_pl.evaluation.collector import RegionTestCollector
from fineregion_pl.evaluation.loops import answer_vision_questions, grounding_keys
from fineregion_pl.model.captioner import question_relation, vision_question_groups
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings

RELATIONS = ["left of", "right of", "above", "below"]


def test_question_relation_reads_the_relation_asked_about():
    assert question_relation("what is left of the red square?", RELATIONS) == "left of"
    assert question_relation("What is above the large circle?", RELATIONS) == "above"
    # the earliest relation wins: the anchor's own words never decide
    assert question_relation("what is below the square left of the cross?", RELATIONS) == "below"
    assert question_relation("what colour is the square?", RELATIONS) is None


@pytest.fixture(scope="module")
def hard_data(tmp_path_factory):
    from fineregion_pl.data.synthetic_hard import write_hard_synthetic

    out = tmp_path_factory.mktemp("hard")
    write_hard_synthetic(out, {"train": 8, "test": 8}, seed=0, shard_size=8, progress=False)
    return out


def test_vision_questions_reach_the_batch_and_group_by_relation(hard_data):
    data = RegionDataModule([str(hard_data)], image_size=64, batch_size=8, num_workers=0, max_regions=16)
    batch = first_batch(data, "test")
    questions = [q for per_image in batch["vision_questions"] for q in per_image]
    assert len(questions) >= 8  # up to two per hard image
    index = batch["region_valid"].nonzero()
    groups = vision_question_groups(batch, index, RELATIONS)
    assert sum(len(rows) for rows, _ in groups.values()) == len(questions)  # every anchor is in the batch
    for relation, (rows, kept) in groups.items():
        for row, q in zip(rows, kept):
            b, n = index[row].tolist()
            assert batch["region_ids"][b][n] == q["regions"][0]  # the anchor's prompt answers
            assert f"what is {relation} " in q["question"]
    assert vision_question_groups(batch, index, ["behind"]) == {}


@pytest.mark.slow
def test_vision_question_loss_learns_and_test_writes_the_answers(hard_data, stage1_checkpoint, tiny_lm, tmp_path):
    lm = LanguageModelConfig(name_or_path=str(tiny_lm), lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    torch.manual_seed(0)
    module = Stage2Module(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32,
                          caption_weight=0.0, vision_question_weight=1.0, lr=3e-3, warmup_steps=0)
    data = RegionDataModule([str(hard_data)], image_size=64, batch_size=8, num_workers=0, max_regions=16)
    batch = first_batch(data, "test")
    recorder = LossRecorder()
    trainer = tiny_trainer(tmp_path, max_steps=60, callbacks=[recorder], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 60))
    first, last = recorder.losses[0], sum(recorder.losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)

    captioner = module.model.eval()
    with torch.no_grad():
        encoded = captioner.encode(batch)
        answers = answer_vision_questions(captioner, batch, encoded)
        keys = grounding_keys(batch, encoded)
    questions = [q for per_image in batch["vision_questions"] for q in per_image]
    assert len(answers) == len(questions)
    assert {(a["image_id"], a["question"]) for a in answers} == {(img, q["question"]) for img, qs in zip(batch["image_ids"], batch["vision_questions"]) for q in qs}
    right = sum(a["predicted"] == a["answer"] for a in answers)

    collector = RegionTestCollector()
    collector.add(batch, captioner.describe_batch(batch, encoded), grounding=[(1.0, 0.9, 0.2)] * len(keys), grounding_keys=keys, vision=answers)
    results = collector.compute(module.hparams.categories, module.hparams.num_classes, java=False)
    assert results["vision_questions"] == {"accuracy": right / len(answers), "questions": len(answers)}
    collector.write(results, tmp_path / "out", java=False)
    written = [json.loads(line) for line in (tmp_path / "out" / "vision_questions.jsonl").read_text().splitlines()]
    assert [w["correct"] for w in written] == [a["predicted"] == a["answer"] for a in answers]
    expressions = [json.loads(line) for line in (tmp_path / "out" / "expressions.jsonl").read_text().splitlines()]
    assert [(e["image_id"], e["region_id"]) for e in expressions] == keys and all(e["hit"] == 1.0 for e in expressions)
