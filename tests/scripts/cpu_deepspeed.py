"""``RegionDeepSpeedStrategy`` on the CPU, for tests only.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA in three places (the accelerator check,
the device-index check, and the engine's ``device_rank`` taken from ``root_device.index``); DeepSpeed
itself runs on the CPU over gloo. This subclass lifts those three so a test can run the real
Lightning + DeepSpeed path (``fit``, checkpoint folders, resuming) with our strategy's code. It is
not a way to train: GPUs are.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from fineregion_pl.train.strategies import RegionDeepSpeedStrategy


class CPUDeepSpeedStrategy(RegionDeepSpeedStrategy):
    """``RegionDeepSpeedStrategy`` with Lightning's CUDA-only checks lifted (gloo on the CPU)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA only" check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed wants an index; every CPU rank has device 0
