"""Training callbacks: throughput (images, regions and text tokens per second, MFU) during ``fit``."""

from __future__ import annotations

import random
import time
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only

from fineregion_pl.lightning_private import log_metrics, logs_this_step, training_clock_start
from fineregion_pl.model.errors import NonFiniteLossError


def images_in_batch(batch: dict[str, Any]) -> int:
    """Samples of a region batch: its images."""
    return int(batch["images"].shape[0])


def regions_in_batch(batch: dict[str, Any]) -> int:
    """Items of a region batch: its valid (not padded) regions.

    Never fewer than the images: Lightning's ``Throughput`` requires items >= samples, and an
    evaluation batch may hold images without regions (a training batch never does: the stream
    drops them).
    """
    return max(int(batch["region_valid"].sum()), images_in_batch(batch))


class RegionThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for region batches, plus text tokens per second.

    Logs (every ``log_every_n_steps``, once ``window_size`` batches have been seen, as a rolling
    average over them; validation time is left out of the training figures):

    - ``train/device/samples_per_sec``: images per second (a sample is an image with all its regions);
    - ``train/device/items_per_sec``: valid regions per second;
    - ``train/device/batches_per_sec``, and the totals ``train/samples``, ``train/lengths`` (regions), ``train/time``;
    - ``train/device/flops_per_sec`` and ``train/device/mfu`` when the module has a ``flops_per_batch``
      attribute (or ``measure_flops`` is on) and, for MFU, Lightning knows the device's peak
      (``get_available_flops``: CUDA devices it lists; none on a CPU);
    - ``train/tokens_per_sec`` and ``train/device/tokens_per_sec``: text tokens per second, when
      the module sets ``last_batch_tokens`` (the text tokens of the training batch it just ran;
      ``train/tokens_per_sec`` is over all ranks, assuming every rank runs alike, as Lightning's
      global figures do);
    - with several devices, the global ``train/samples_per_sec`` etc. as well.

    The same keys with ``validate/`` are logged during validation inside ``fit``.

    Args:
        window_size: batches in the rolling average (rates appear once this many were seen).
        separator: key separator (``train/device/...``).
        measure_flops: when the module has no ``flops_per_batch``, count the FLOPs of the first
            training batch (forward and backward, ``torch.utils.flop_counter.FlopCounterMode``:
            matmuls, convolutions and attention) and use them as ``flops_per_batch`` for every
            batch. They are the FLOPs the step executed (recomputation with gradient checkpointing
            included, weight gradients of frozen weights not), on this rank's first batch.
    """

    def __init__(self, window_size: int = 20, separator: str = "/", measure_flops: bool = False) -> None:
        super().__init__(batch_size_fn=images_in_batch, length_fn=regions_in_batch, window_size=window_size, separator=separator)
        self.window_size = window_size
        self.separator = separator
        self.measure_flops = measure_flops
        self._flop_counter: Optional[torch.utils.flop_counter.FlopCounterMode] = None
        self._tokens: Optional[Throughput] = None
        self._token_total = 0
        self._token_batches = 0
        self._token_t0 = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._tokens = Throughput(window_size=self.window_size, separator=self.separator)
        self._token_total = self._token_batches = 0
        self._token_t0 = time.perf_counter()
        self._flop_counter = None  # a new fit measures its module again (when it has no flops_per_batch)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.measure_flops and self._flop_counter is None and not hasattr(pl_module, "flops_per_batch"):
            from torch.utils.flop_counter import FlopCounterMode

            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        counter = self._flop_counter
        if counter is not None and not hasattr(pl_module, "flops_per_batch"):
            counter.__exit__(None, None, None)
            pl_module.flops_per_batch = int(counter.get_total_flops())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update_tokens(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._flop_counter is not None and not hasattr(pl_module, "flops_per_batch"):
            self._flop_counter.__exit__(None, None, None)  # a step that failed must not leave the counter on

    @rank_zero_only
    def _update_tokens(self, trainer, pl_module) -> None:
        tokens = getattr(pl_module, "last_batch_tokens", None)
        if tokens is None or self._tokens is None:
            return
        self._token_total += int(tokens)
        self._token_batches += 1
        # the parent's training clock (moved on past validation), so both rates cover the same time
        t0 = training_clock_start(self, self._token_t0)
        self._tokens.update(time=time.perf_counter() - t0, batches=self._token_batches, samples=max(self._token_total, self._token_batches))
        if not logs_this_step(trainer):
            return
        rate = self._tokens.compute().get(f"device{self.separator}samples_per_sec")
        if rate is None:
            return
        sep = self.separator
        metrics = {f"train{sep}device{sep}tokens_per_sec": rate, f"train{sep}tokens_per_sec": rate * trainer.world_size}
        log_metrics(trainer, metrics)  # as the parent logs its figures (same step)


def _forward_outside_wrapper(trainer) -> bool:
    """Whether the module's own forward works outside the strategy's wrapper: one device, DDP and
    DeepSpeed ZeRO-1/2 (full weights on every rank), not FSDP or ZeRO-3 (sharded weights; there the
    gate checks each rank's shard of the weights only)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not getattr(strategy, "zero_stage_3", False)


class CheckpointGate(Callback):
    """Keeps poisoned weights out of checkpoints: on every step a ``ModelCheckpoint`` is about to
    save (``every_n_train_steps``), the weights the optimizer just produced are checked first,
    finite themselves and giving a finite loss on the step's batch (one extra forward, in eval
    mode, RNG states restored so the run is unchanged). Otherwise :class:`NonFiniteLossError` stops
    the run before that checkpoint is written, on every rank at once.

    The modules add it themselves (``configure_callbacks``); Lightning runs checkpoint callbacks
    after all others, so it always comes first.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        periods = [cb._every_n_train_steps for cb in trainer.checkpoint_callbacks if getattr(cb, "_every_n_train_steps", 0)]
        if not any(step % n == 0 for n in periods):
            return
        was_training = pl_module.training
        states = (random.getstate(), np.random.get_state())
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                pl_module.eval()
                finite = all(torch.isfinite(p).all() for p in pl_module.parameters() if p.requires_grad and p.numel() > 0)
                if finite and _forward_outside_wrapper(trainer):
                    finite = all(torch.isfinite(v).all() for v in pl_module.training_losses(batch).values())
        finally:
            pl_module.train(was_training)
            random.setstate(states[0])
            np.random.set_state(states[1])
        bad = trainer.strategy.reduce(torch.tensor(0.0 if finite else 1.0, device=pl_module.device), reduce_op="sum")
        if float(bad) > 0:
            raise NonFiniteLossError(
                f"after the optimizer step of step {step - 1} the weights give a non-finite loss (or are non-finite) on "
                f"{int(float(bad))} rank(s); stopped before the checkpoint of step {step} was written, so the last checkpoint on "
                "disk is the last good one: lower the learning rate or clip gradients, then resume with --ckpt_path last"
            )
