"""A test callback: writes the global step to a file after every batch and waits a little, so a
test can signal a run in the middle of its training (the SLURM requeue test)."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepProgress(Callback):
    """After each training batch: ``path`` holds ``"<global step> <restarts>"``, then sleep ``seconds``."""

    def __init__(self, path: str, seconds: float = 0.5):
        self.path, self.seconds = Path(path), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            self.path.write_text(f"{trainer.global_step}\n")
        time.sleep(self.seconds)
