"""Shared test fixtures: tiny synthetic shards, a tiny pretrained LM, tiny model configs.

Everything is real (timm Swin, HF Llama + peft LoRA, webdataset shards, Lightning Trainer) at the
smallest sizes that still exercise the code paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_BACKBONE_KWARGS = dict(embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=4, img_size=64)


def tiny_encoder_config(**overrides):
    """A tiny Swin (3 stages, 64 px input) with feature levels at 8x8 and 4x4."""
    from fineregion_pl.model.encoder import EncoderConfig

    values = dict(backbone="swin_tiny_patch4_window7_224", feature_levels=[1, 2], backbone_kwargs=dict(TINY_BACKBONE_KWARGS))
    values.update(overrides)
    return EncoderConfig(**values)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """Synthetic shards: 96 train, 16 val, 16 test images of 64 px."""
    from fineregion_pl.data.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    config = SyntheticConfig(image_size=64, min_shapes=2, max_shapes=4)
    # shape sizes of the benchmark are for 128 px; at 64 px every shape still fits
    write_synthetic(out, {"train": 96, "val": 16, "test": 16}, seed=0, shard_size=32, config=config, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A word-level tokenizer and a 1-layer Llama pretrained for a few steps, saved with save_pretrained."""
    from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts

    out = tmp_path_factory.mktemp("tiny-lm")
    return build_tiny_lm(out, synthetic_pretraining_texts(0, 200), hidden_size=32, num_layers=1, num_heads=2, steps=150, lr=1e-2, progress=False)


def tiny_trainer(tmp_path, max_steps: int, **kwargs):
    """A CPU Lightning Trainer without logger/progress bar, writing into ``tmp_path``."""
    import lightning as L

    defaults = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), check_val_every_n_epoch=None,
        val_check_interval=max(1, max_steps), limit_val_batches=1, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="session")
def stage1_checkpoint(tmp_path_factory, synthetic_data) -> Path:
    """A stage-1 checkpoint after a few real training steps on the tiny synthetic shards."""
    import lightning as L

    from fineregion_pl import RegionDataModule, Stage1Module

    L.seed_everything(0)
    out = tmp_path_factory.mktemp("stage1")
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5, categories=["circle", "square", "triangle", "diamond", "cross"])
    data = RegionDataModule([str(synthetic_data)], image_size=64, batch_size=8, num_workers=0)
    trainer = tiny_trainer(out, max_steps=4, enable_checkpointing=False)
    trainer.fit(module, data)
    path = out / "stage1.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def stage2_checkpoint(tmp_path_factory, synthetic_data, tiny_lm, stage1_checkpoint) -> Path:
    """A stage-2 checkpoint after a few real training steps (tiny LM with LoRA, stage-1 encoder)."""
    import lightning as L

    from fineregion_pl import RegionDataModule, Stage2Module
    from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings

    L.seed_everything(0)
    out = tmp_path_factory.mktemp("stage2")
    language = LanguageModelConfig(name_or_path=str(tiny_lm), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    module = Stage2Module(init_from=str(stage1_checkpoint), language_model=language, prompt_tokens=2, prompt_hidden=32, max_new_tokens=6)
    data = RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)
    trainer = tiny_trainer(out, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, data)
    path = out / "stage2.ckpt"
    trainer.save_checkpoint(path)
    return path
