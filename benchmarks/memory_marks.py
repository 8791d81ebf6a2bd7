"""A Lightning callback that writes the process's resident memory at each hook of a run (for the smoke run).

    fineregion-pl fit ... --trainer.callbacks+=benchmarks.memory_marks.MemoryMarks

Each line of ``$FINEREGION_MEMORY_MARKS`` (a JSON-lines file; nothing is written without it) is
``{"hook", "step", "rss_gb", "peak_gb"}``: the resident set now and the process's peak so far
(``/proc/self/status`` VmRSS / VmHWM), so the step that sets the peak can be found.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L


def resident_gb() -> tuple[float, float]:
    """(now, peak so far) resident set of this process in GB, from ``/proc/self/status``."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / 1e9
    return round(values.get("VmRSS", 0.0), 3), round(values.get("VmHWM", 0.0), 3)


class MemoryMarks(L.Callback):
    """Appends the resident memory at setup, each step's forward/backward/optimizer hooks, validation and saves."""

    def __init__(self) -> None:
        self.path = os.environ.get("FINEREGION_MEMORY_MARKS")

    def mark(self, trainer: L.Trainer, hook: str) -> None:
        if not self.path:
            return
        now, peak = resident_gb()
        with open(self.path, "a") as out:
            out.write(json.dumps({"hook": hook, "step": trainer.global_step, "rss_gb": now, "peak_gb": peak}) + "\n")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.mark(trainer, f"setup:{stage}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "fit_start")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "test_start")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.mark(trainer, "train_batch_start")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        self.mark(trainer, "before_backward")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "after_backward")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.mark(trainer, "before_optimizer_step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.mark(trainer, "train_batch_end")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "validation_start")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "validation_end")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.mark(trainer, "save_checkpoint")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "train_end")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark(trainer, "test_end")
