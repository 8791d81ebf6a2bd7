"""Helpers for tests that check a module learns: train on one fixed batch through a real Trainer."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader


class LossRecorder(L.Callback):
    """Records the loss of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def fixed_batch_loader(batch: dict, steps: int) -> DataLoader:
    """A DataLoader that yields the same (already collated) batch ``steps`` times."""
    return DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)


def first_batch(datamodule, split: str = "train") -> dict:
    loader = {"train": datamodule.train_dataloader, "test": datamodule.test_dataloader, "val": datamodule.val_dataloader}[split]()
    return next(iter(loader))
