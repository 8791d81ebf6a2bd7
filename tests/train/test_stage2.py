"""Stage 2: stage-1 weights carried over, only LoRA + prompt train in the LM, it learns, it generates."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer
from learning import LossRecorder, first_batch, fixed_batch_loader

from fineregion_pl import RegionDataModule, Stage2Module
from fineregion_pl.evaluation.loops import ground_expressions
from fineregion_pl.model.captioner import spatial_pairs
from fineregion_pl.model.checkpoint_files import read_checkpoint
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings


def make_stage2(stage1_checkpoint, tiny_lm, **kwargs) -> Stage2Module:
    lm = LanguageModelConfig(name_or_path=str(tiny_lm), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    defaults = dict(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32, lr=3e-3, warmup_steps=1, max_new_tokens=6)
    defaults.update(kwargs)
    torch.manual_seed(0)
    module = Stage2Module(**defaults)
    module.setup("fit")  # what the Trainer does first: loads the stage-1 weights
    module.configure_model()  # then builds the LM and the prompt
    return module


@pytest.fixture(scope="module")
def data(synthetic_data):
    return RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)


def test_stage2_encoder_equals_stage1_checkpoint(stage1_checkpoint, tiny_lm):
    module = make_stage2(stage1_checkpoint, tiny_lm)
    saved = {k[len("model."):]: v for k, v in read_checkpoint(stage1_checkpoint)["state_dict"].items() if k.startswith("model.")}
    own = module.model.vision.state_dict()
    assert set(saved) == set(own)
    for key, value in saved.items():
        assert torch.equal(own[key], value), key
    assert module.hparams.num_classes == 5 and module.hparams.categories[:2] == ["circle", "square"]


def test_stage2_trains_only_lora_and_prompt_in_the_lm(stage1_checkpoint, tiny_lm):
    module = make_stage2(stage1_checkpoint, tiny_lm, freeze_encoder=True)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train"
    assert all(n.startswith("model.prompt.") or "lora_" in n for n in trainable), [n for n in trainable if not n.startswith("model.prompt.") and "lora_" not in n]
    assert any("lora_" in n for n in trainable) and any(n.startswith("model.prompt.") for n in trainable)
    frozen_lm = [n for n, p in module.model.language.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen_lm)


def test_stage2_training_steps_lower_the_caption_loss(stage1_checkpoint, tiny_lm, data, tmp_path):
    module = make_stage2(stage1_checkpoint, tiny_lm, masking="hard", lr=1e-2)
    batch = first_batch(data)
    recorder = LossRecorder()
    trainer = tiny_trainer(tmp_path, max_steps=20, callbacks=[recorder], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 20))
    assert sum(recorder.losses[-3:]) / 3 < 0.7 * sum(recorder.losses[:3]) / 3


def test_generation_gives_one_caption_per_valid_region(stage1_checkpoint, tiny_lm, data):
    module = make_stage2(stage1_checkpoint, tiny_lm).eval()
    batch = first_batch(data, "test")
    batch["region_valid"][0, -1] = False  # one more padded slot
    rows = module.model.describe_batch(batch)
    expected = [(batch["image_ids"][b], batch["region_ids"][b][n]) for b, n in batch["region_valid"].nonzero().tolist()]
    assert [(r["image_id"], r["region_id"]) for r in rows] == expected
    assert all(isinstance(r["caption"], str) for r in rows)
    assert len(rows) == int(batch["region_valid"].sum()) < batch["region_valid"].numel()


def test_stage2_checkpoint_skips_frozen_lm_weights_and_reloads(stage1_checkpoint, tiny_lm, data, tmp_path):
    module = make_stage2(stage1_checkpoint, tiny_lm)
    batch = first_batch(data)
    trainer = tiny_trainer(tmp_path, max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 2))
    path = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(path)
    state = read_checkpoint(path)["state_dict"]
    assert not any(k in state for k in module.frozen_lm_keys())
    assert any("lora_" in k for k in state)
    restored = Stage2Module.load_from_checkpoint(path, weights_only=True).eval()
    module.eval()
    with torch.no_grad():
        prompts_a = module.model.encode(batch).prompts
        prompts_b = restored.model.encode(batch).prompts
        logits_a, *_ = module.model.language.teacher_forced(prompts_a, ["a small red circle"] * len(prompts_a))
        logits_b, *_ = restored.model.language.teacher_forced(prompts_b, ["a small red circle"] * len(prompts_b))
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)


def test_stage2_refuses_a_stage1_checkpoint_as_its_own(stage1_checkpoint, tiny_lm):
    module = make_stage2(stage1_checkpoint, tiny_lm)
    checkpoint = read_checkpoint(stage1_checkpoint)
    with pytest.raises(BadInputError, match="missing .* key"):
        module.on_load_checkpoint(checkpoint)


def test_init_from_a_checkpoint_that_does_not_fit_names_the_keys(stage1_checkpoint, tiny_lm, tmp_path):
    checkpoint = read_checkpoint(stage1_checkpoint)
    del checkpoint["state_dict"]["model.head.1.weight"]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \['head.1.weight'\]"):
        make_stage2(broken, tiny_lm)


def test_consistency_gradient_through_the_lm_reaches_the_prompt(stage1_checkpoint, tiny_lm, data):
    module = make_stage2(stage1_checkpoint, tiny_lm, masking="hard")
    batch = first_batch(data)
    batch["boxes"][:, :, :] = torch.tensor([4.0, 4.0, 40.0, 40.0])  # every region of an image overlaps every other
    losses = module.losses(batch)
    assert losses["consistency_loss"] > 0
    losses["consistency_loss"].backward()
    grads = [p.grad for p in module.model.prompt.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_no_region_control_hides_the_regions_but_scores_against_their_real_boxes(stage1_checkpoint, tiny_lm, data):
    module = make_stage2(stage1_checkpoint, tiny_lm, ignore_regions=True).eval()
    batch = first_batch(data, "test")
    with torch.no_grad():
        encoded = module.model.encode(batch, ignore_regions=True)
    index, prompts = encoded.index, encoded.prompts
    first_image = index[:, 0] == 0
    assert first_image.sum() > 1
    # every region of an image gets the same prompt: nothing tells the regions apart
    assert torch.allclose(prompts[first_image], prompts[first_image][:1].expand_as(prompts[first_image]), atol=1e-5)
    real = batch["boxes"][index[:, 0], index[:, 1]]
    assert torch.allclose(module.model.reported_boxes(batch)[0][index[:, 0], index[:, 1]], real.clamp(min=0, max=64), atol=1e-4)
    rows = module.model.describe_batch(batch, encoded)
    assert torch.allclose(torch.tensor([r["box"] for r in rows[:3]]), real[:3].clamp(min=0, max=64) / batch["scales"][index[:3, 0], None], atol=0.05)
    # spatial questions: the pair token sees the whole image too, not the real boxes
    first, second, _ = spatial_pairs(batch, index)
    assert first, "the test batch should hold spatial questions"
    pair_prompts = module.model.question_prompts(encoded, first, second)[1]
    same_image = [k for k, f in enumerate(first) if index[f, 0] == index[first[0], 0]]
    assert torch.allclose(pair_prompts[same_image], pair_prompts[same_image[:1]].expand_as(pair_prompts[same_image]), atol=1e-5)
    outcomes = ground_expressions(module.model, batch, encoded)
    hit = sum(h for h, _, _ in outcomes) / len(outcomes)
    miou = sum(i for _, i, _ in outcomes) / len(outcomes)
    assert hit < 0.8 and miou < 0.8  # all candidates tie: credit is shared, not a free 1.0
