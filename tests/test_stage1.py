"""Stage 1 trains through a real Lightning Trainer and its checkpoint carries what stage 2 needs."""

from __future__ import annotations

import torch

from conftest import tiny_encoder_config, tiny_trainer
from learning import LossRecorder, first_batch, fixed_batch_loader

from fineregion_pl import RegionDataModule, Stage1Module
from fineregion_pl.checkpoints import read_checkpoint


def test_stage1_training_steps_lower_the_loss(synthetic_data, tmp_path):
    torch.manual_seed(0)
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5, masking="hard", lr=3e-3, warmup_steps=1)
    batch = first_batch(RegionDataModule([str(synthetic_data)], image_size=64, batch_size=8, num_workers=0))
    recorder = LossRecorder()
    trainer = tiny_trainer(tmp_path, max_steps=25, callbacks=[recorder], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 25))
    assert len(recorder.losses) == 25
    assert sum(recorder.losses[-3:]) / 3 < 0.7 * sum(recorder.losses[:3]) / 3


def test_stage1_checkpoint_keeps_plain_hparams(stage1_checkpoint):
    checkpoint = read_checkpoint(stage1_checkpoint)  # weights_only=True: no pickled objects inside
    hparams = checkpoint["hyper_parameters"]
    assert hparams["encoder"]["backbone_kwargs"]["embed_dim"] == 16
    assert hparams["num_classes"] == 5 and hparams["categories"][0] == "circle"
    assert any(k.startswith("model.encoder.backbone.") for k in checkpoint["state_dict"])


def test_stage1_reloads_from_checkpoint(stage1_checkpoint, synthetic_data):
    module = Stage1Module.load_from_checkpoint(stage1_checkpoint, weights_only=True).eval()
    batch = first_batch(RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0), "test")
    out = module(batch)
    assert out.logits.shape == (*batch["region_valid"].shape, 5)
    assert torch.isfinite(out.logits).all()
