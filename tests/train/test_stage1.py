"""Stage 1 trains through a real Lightning Trainer and its checkpoint carries what stage 2 needs."""

from __future__ import annotations

import torch
from conftest import tiny_encoder_config, tiny_trainer
from learning import LossRecorder, first_batch, fixed_batch_loader

from fineregion_pl import RegionDataModule, Stage1Module
from fineregion_pl.model.checkpoint_files import read_checkpoint


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


class MetricRecorder(LossRecorder):
    """Records logged training metrics after every step."""

    def __init__(self, *keys: str) -> None:
        super().__init__()
        self.keys, self.values = keys, {k: [] for k in keys}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        for key in self.keys:
            self.values[key].append(float(trainer.callback_metrics[key]))


def test_training_raises_attention_inside_regions_and_lowers_mask_loss(synthetic_data, tmp_path):
    torch.manual_seed(0)
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5, masking="dynamic", lr=3e-3, warmup_steps=1, mask_loss_weight=1.0)
    batch = first_batch(RegionDataModule([str(synthetic_data)], image_size=64, batch_size=8, num_workers=0))
    recorder = MetricRecorder("train/mask_loss", "train/attn_inside")
    trainer = tiny_trainer(tmp_path, max_steps=30, callbacks=[recorder], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, 30))
    mask, inside = recorder.values["train/mask_loss"], recorder.values["train/attn_inside"]
    assert sum(mask[-3:]) < 0.8 * sum(mask[:3])
    assert sum(inside[-3:]) / 3 > sum(inside[:3]) / 3 + 0.1


def count_aten_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def test_forward_has_no_python_loop_over_regions_or_images():
    torch.manual_seed(0)
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5).eval()

    def forward(images: int, regions: int):
        boxes = torch.rand(images, regions, 4) * 32
        boxes[..., 2:] += boxes[..., :2]
        batch = {"images": torch.randn(images, 3, 64, 64), "boxes": boxes, "region_valid": torch.ones(images, regions, dtype=torch.bool)}
        return lambda: module(batch)

    with torch.no_grad():
        counts = {(b, n): count_aten_ops(forward(b, n)) for b, n in [(2, 1), (2, 16), (4, 1), (4, 16), (8, 3)]}
    # the same aten calls whatever the number of images and regions: nothing loops over them
    assert len(set(counts.values())) == 1, counts
