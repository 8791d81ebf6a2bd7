"""Stage 2 on each LM family (Llama-style, GPT-2, T5): it learns, batched generation is exact, exports round-trip."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_trainer
from learning import LossRecorder, first_batch, fixed_batch_loader
from peft import PeftModel

from fineregion_pl import RegionDataModule, Stage2Module
from fineregion_pl.commands.export import export
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings

FAMILIES = ["llama", "gpt2", "t5"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_lm(request, tmp_path_factory):
    from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts

    out = tmp_path_factory.mktemp(f"lm-{request.param}")
    build_tiny_lm(out, synthetic_pretraining_texts(0, 150), hidden_size=32, num_layers=1, num_heads=2, steps=120, lr=1e-2, progress=False, family=request.param)
    return request.param, out


@pytest.fixture(scope="module")
def data(synthetic_data):
    return RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)


def make(stage1_checkpoint, lm_dir, **lora) -> Stage2Module:
    torch.manual_seed(0)
    settings = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    settings.update(lora)
    config = LanguageModelConfig(name_or_path=str(lm_dir), lora=LoraSettings(**settings))
    module = Stage2Module(init_from=str(stage1_checkpoint), language_model=config, prompt_tokens=2, prompt_hidden=32, masking="hard", lr=1e-2, warmup_steps=1, max_new_tokens=6)
    module.configure_model()
    return module


def test_each_family_learns_captions(family_lm, stage1_checkpoint, data, tmp_path):
    family, lm_dir = family_lm
    module = make(stage1_checkpoint, lm_dir)
    assert module.model.language.encoder_decoder == (family == "t5")
    recorder = LossRecorder()
    trainer = tiny_trainer(tmp_path, max_steps=20, callbacks=[recorder], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(first_batch(data), 20))
    assert sum(recorder.losses[-3:]) < 0.9 * sum(recorder.losses[:3]), (family, recorder.losses)


def test_batched_greedy_equals_one_region_at_a_time(family_lm, stage1_checkpoint, data):
    _, lm_dir = family_lm
    module = make(stage1_checkpoint, lm_dir).eval()
    batch = first_batch(data, "test")
    prompts = module.model.encode(batch).prompts
    batched = module.model.language.generate(prompts, max_new_tokens=6)
    single = [module.model.language.generate(prompts[i : i + 1], max_new_tokens=6)[0] for i in range(len(prompts))]
    assert len(batched) == len(prompts) > 1
    assert batched == single
    beams = module.model.language.generate(prompts, max_new_tokens=6, num_beams=3)
    assert len(beams) == len(prompts) and all(isinstance(b, str) for b in beams)


@pytest.mark.parametrize("target", [None, "all-linear"])
def test_lora_targets_per_family_default_and_all_linear(family_lm, stage1_checkpoint, target):
    family, lm_dir = family_lm
    module = make(stage1_checkpoint, lm_dir, target_modules=target)
    adapted = {n.split(".lora_")[0].split(".")[-1] for n, p in module.model.language.named_parameters() if "lora_A" in n}
    defaults = {"llama": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}, "t5": {"q", "v"}}[family]
    assert adapted == defaults if target is None else adapted > defaults


def test_full_fine_tuning_trains_every_lm_weight(family_lm, stage1_checkpoint):
    _, lm_dir = family_lm
    module = make(stage1_checkpoint, lm_dir, enabled=False)
    assert all(p.requires_grad for p in module.model.language.parameters())
    assert not isinstance(module.model.language.model, PeftModel)


def test_exports_round_trip(family_lm, stage1_checkpoint, data, tmp_path):
    family, lm_dir = family_lm
    module = make(stage1_checkpoint, lm_dir)
    trainer = tiny_trainer(tmp_path, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(first_batch(data), 3))
    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export(ckpt_path=str(ckpt), out=str(tmp_path / "export"))

    module.eval()
    batch = first_batch(data, "test")
    with torch.no_grad():
        prompts = module.model.encode(batch).prompts
        context = module.model.language.context_embeddings(prompts, "caption")
        ids, _ = module.model.language.tokenize_targets(["a small red circle"] * len(prompts), context.device)
        auto = transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM

        def logits(model):
            if family == "t5":
                return model(inputs_embeds=context, labels=ids).logits
            return model(inputs_embeds=torch.cat([context, model.get_input_embeddings()(ids)], 1)).logits

        expected = logits(module.model.language.model)
        adapter = PeftModel.from_pretrained(auto.from_pretrained(lm_dir), out / "adapter").eval()
        merged = auto.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(logits(adapter), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)
    assert (out / "vision.safetensors").is_file() and (out / "fineregion.json").is_file()
