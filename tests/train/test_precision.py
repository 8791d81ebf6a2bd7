"""Every precision a user can choose trains, or is refused up front with one line.

``language_model.dtype: auto`` follows ``trainer.precision``; an explicit dtype that cannot run
under it (bfloat16 weights under float16 autocast, or the reverse) is refused before anything loads.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import tiny_trainer
from learning import first_batch, fixed_batch_loader

from fineregion_pl import RegionDataModule, Stage2Module
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings
from fineregion_pl.model.precision import language_model_dtype

PRECISIONS = ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
REFUSED = {("bfloat16", "16-mixed"), ("bfloat16", "16-true"), ("float16", "bf16-mixed"), ("float16", "bf16-true")}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_dtype_follows_or_refuses_the_precision(dtype, precision):
    if (dtype, precision) in REFUSED:
        with pytest.raises(BadInputError, match=rf"language_model.dtype {dtype} cannot run under trainer.precision {precision}.*set language_model.dtype auto"):
            language_model_dtype(dtype, precision)
        return
    follows = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16, "16-true": torch.float16}
    assert language_model_dtype(dtype, precision) == (follows[precision] if dtype == "auto" else getattr(torch, dtype))


def test_outside_a_trainer_auto_is_float32_and_a_bad_name_is_one_line():
    assert language_model_dtype("auto", None) == torch.float32 and language_model_dtype(None, None) == torch.float32
    assert language_model_dtype("bfloat16", None) == torch.bfloat16
    with pytest.raises(BadInputError, match="language_model.dtype 'half16' is not a dtype"):
        language_model_dtype("half16", None)
    with pytest.raises(BadInputError, match="unknown trainer.precision"):
        language_model_dtype("auto", "8-mixed")


class GradientCheck(L.Callback):
    """Records, after each backward, whether every gradient is finite and some are non-zero."""

    def __init__(self) -> None:
        self.finite: list[bool] = []
        self.nonzero: list[bool] = []
        self.lm_dtype = None

    def on_after_backward(self, trainer, module) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.finite.append(bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads))
        self.nonzero.append(any(float(g.abs().sum()) > 0 for g in grads))
        self.lm_dtype = module.model.language.model.get_input_embeddings().weight.dtype


@pytest.fixture(scope="module")
def batch(synthetic_data):
    return first_batch(RegionDataModule([str(synthetic_data)], image_size=64, batch_size=2, num_workers=0))


# the CPU pairs: Lightning runs "16-mixed" as bf16-mixed on a CPU, so it is covered by the table above
TRAINED = [(d, p) for p in ("32-true", "bf16-mixed", "bf16-true", "16-true") for d in DTYPES]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, precision", TRAINED)
def test_every_allowed_pair_trains_a_step_with_finite_gradients(dtype, precision, stage1_checkpoint, tiny_lm, batch, tmp_path):
    lm = LanguageModelConfig(name_or_path=str(tiny_lm), dtype=dtype, lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    module = Stage2Module(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32, warmup_steps=1,
                          consistency_weight=0.1, mask_loss_weight=0.1, referring_weight=0.5, spatial_weight=0.2)
    check = GradientCheck()
    trainer = tiny_trainer(tmp_path, max_steps=1, precision=precision, callbacks=[check], enable_checkpointing=False, limit_val_batches=0)
    if (dtype, precision) in REFUSED:
        with pytest.raises(BadInputError, match="cannot run under trainer.precision"):
            trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 1))
        return
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 1))
    assert check.finite == [True] and check.nonzero == [True]
    runs_in = {"32-true": None, "bf16-mixed": None, "bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]
    expected = runs_in or language_model_dtype(dtype, precision)  # "-true" precisions cast the whole module
    assert check.lm_dtype == expected
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.slow
def test_export_of_a_bf16_trained_model_captions_like_its_checkpoint(stage1_checkpoint, tiny_lm, synthetic_data, tmp_path):
    import json

    from fineregion_pl.commands.export import export
    from fineregion_pl.model.captioner import RegionCaptioner

    lm = LanguageModelConfig(name_or_path=str(tiny_lm), dtype="bfloat16", lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    module = Stage2Module(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32, lr=3e-2, warmup_steps=1, max_new_tokens=6)
    data = RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)
    trainer = tiny_trainer(tmp_path, max_steps=4, precision="bf16-mixed", enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, data)
    ckpt = tmp_path / "bf16.ckpt"
    trainer.save_checkpoint(ckpt)

    exported = export(ckpt_path=str(ckpt), out=str(tmp_path / "export"))
    card = json.loads((exported / "fineregion.json").read_text())
    assert card["dtype"] == "float32" and card["max_logit_difference"] < 1e-4
    reference, loaded = RegionCaptioner.from_checkpoint(ckpt, dtype="float32"), RegionCaptioner.from_pretrained(exported)
    captions = [(reference.describe_batch(batch), loaded.describe_batch(batch)) for batch in data.test_dataloader()]
    assert sum(len(a) for a, _ in captions) >= 16 and all(a == b for a, b in captions)  # every region of the test split

    half = export(ckpt_path=str(ckpt), out=str(tmp_path / "export-bf16"), dtype="bfloat16")
    assert json.loads((half / "fineregion.json").read_text())["max_logit_difference"] > 1e-4  # the cost of saving in bf16, recorded
