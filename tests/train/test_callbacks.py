"""RegionThroughputMonitor logs images, regions and text tokens per second (and MFU) during a real fit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_encoder_config, tiny_trainer
from learning import first_batch, fixed_batch_loader
from lightning.pytorch.loggers import Logger

from fineregion_pl import RegionDataModule, Stage1Module, Stage2Module
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings
from fineregion_pl.train.callbacks import RegionThroughputMonitor, images_in_batch, regions_in_batch

FAKE_PEAK = 1e12  # a device peak for the MFU figure (a CPU has none in Lightning's table)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def last(self, key: str) -> float:
        values = [m[key] for _, m in self.records if key in m]
        assert values, f"{key} never logged; logged keys: {sorted({k for _, m in self.records for k in m})}"
        return float(values[-1])

    def steps_with(self, key: str) -> list[int]:
        return [step for step, m in self.records if key in m]


def positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def data(synthetic_data):
    return RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)


def fit(module, batch, tmp_path, monitor, steps: int) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = tiny_trainer(tmp_path, max_steps=steps, logger=logger, log_every_n_steps=1, callbacks=[monitor],
                           enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(batch, steps))
    return logger


def test_region_counts_of_a_batch():
    batch = {"images": torch.zeros(3, 3, 8, 8), "region_valid": torch.tensor([[True, True], [True, False], [False, False]])}
    assert images_in_batch(batch) == 3
    assert regions_in_batch(batch) == 3  # never fewer than images (Lightning's Throughput requires it)
    batch["region_valid"][2] = True
    assert regions_in_batch(batch) == 5


def test_stage1_fit_logs_images_regions_flops_and_mfu(data, tmp_path, monkeypatch):
    import lightning.pytorch.callbacks.throughput_monitor as throughput_monitor

    monkeypatch.setattr(throughput_monitor, "get_available_flops", lambda device, dtype: FAKE_PEAK)
    torch.manual_seed(0)
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5)
    batch = first_batch(data)
    images, regions = images_in_batch(batch), int(batch["region_valid"].sum())
    assert regions > images  # so the regions-per-image check below means something
    monitor = RegionThroughputMonitor(window_size=3, measure_flops=True)
    logger = fit(module, batch, tmp_path, monitor, steps=6)

    samples = logger.last("train/device/samples_per_sec")
    items = logger.last("train/device/items_per_sec")
    flops = logger.last("train/device/flops_per_sec")
    mfu = logger.last("train/device/mfu")
    assert all(positive_finite(v) for v in (samples, items, flops, mfu)), (samples, items, flops, mfu)
    # the same batch every step: the rates' ratios are exactly the batch's counts
    assert items / samples == pytest.approx(regions / images, rel=1e-6)
    assert flops / samples == pytest.approx(module.flops_per_batch / images, rel=1e-6)
    assert mfu == pytest.approx(flops / FAKE_PEAK, rel=1e-6)
    assert logger.last("train/samples") == 6 * images and logger.last("train/lengths") == 6 * regions
    # the counted step is forward + backward: more than the forward alone, less than 4 forwards
    from torch.utils.flop_counter import FlopCounterMode

    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        module(batch)
    assert 1.5 * forward.get_total_flops() < module.flops_per_batch < 4 * forward.get_total_flops()
    # rates appear once the window is full: from the 3rd step on, at every step (log_every_n_steps=1)
    assert logger.steps_with("train/device/samples_per_sec") == [2, 3, 4, 5]


class TokenCountingStage2(Stage2Module):
    """Sets ``last_batch_tokens`` (caption tokens + EOS) when Stage2Module itself does not."""

    def training_step(self, batch, batch_idx):
        self.__dict__.pop("last_batch_tokens", None)
        loss = super().training_step(batch, batch_idx)
        if getattr(self, "last_batch_tokens", None) is None:
            tokenizer = self.model.language.tokenizer
            captions = [c for region_captions in batch["captions"] for c in region_captions]
            self.last_batch_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in captions)
        return loss


def test_stage2_fit_logs_tokens_per_second(stage1_checkpoint, tiny_lm, data, tmp_path):
    lm = LanguageModelConfig(name_or_path=str(tiny_lm), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    module = TokenCountingStage2(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32, warmup_steps=1)
    batch = first_batch(data)
    monitor = RegionThroughputMonitor(window_size=3)
    logger = fit(module, batch, tmp_path, monitor, steps=5)

    tokens = logger.last("train/tokens_per_sec")
    samples = logger.last("train/device/samples_per_sec")
    assert positive_finite(tokens) and positive_finite(samples)
    assert tokens == logger.last("train/device/tokens_per_sec")  # one device
    assert module.last_batch_tokens > int(batch["region_valid"].sum())  # at least one token + EOS per region
    # both rates over the same window of the same clock (read microseconds apart)
    assert tokens / samples == pytest.approx(module.last_batch_tokens / images_in_batch(batch), rel=0.02)
    assert logger.steps_with("train/tokens_per_sec") == logger.steps_with("train/device/samples_per_sec") == [2, 3, 4]


def test_monitor_without_token_counts_logs_no_tokens(data, tmp_path):
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5)
    logger = fit(module, first_batch(data), tmp_path, RegionThroughputMonitor(window_size=2), steps=3)
    assert positive_finite(logger.last("train/device/items_per_sec"))
    assert not logger.steps_with("train/tokens_per_sec")
    assert not hasattr(module, "flops_per_batch")  # measure_flops is off by default
