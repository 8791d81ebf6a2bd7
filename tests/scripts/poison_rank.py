"""A test callback: on one rank, from one step on, the weights become NaN, so only that rank's loss
is non-finite (the DDP non-finite-loss test)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class PoisonRank(Callback):
    """Before training batch ``step`` on rank ``rank``: every trainable weight filled with NaN."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(float("nan"))
