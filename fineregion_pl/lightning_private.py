"""Every private Lightning attribute the package touches, in one place (tested on the pinned range).

Lightning has no public API for these; each function names what it reads and why.
``tests/test_lightning_private.py`` fails when a Lightning release moves any of them, and
``pyproject.toml`` bounds ``lightning`` to the releases that test passed on.
"""

from __future__ import annotations

from typing import Any, Optional

# what each private name is, for the test that checks they still exist
PRIVATE_NAMES = {
    "ThroughputMonitor._t0s": "per-stage start times of Lightning's throughput clock (set in on_train_start)",
    "_FitLoop._should_accumulate": "whether this batch only accumulates gradients (no optimizer step, no logging)",
    "Trainer._logger_connector": "logs metrics at the trainer's own logging step, as ThroughputMonitor does",
    "_FitLoop._data_source": "the fit loop's dataloader source (DeepSpeed's micro-batch size when the DataModule has none)",
    "_TrainingEpochLoop.batch_progress": "batches read in this epoch (exact mid-epoch resume of the stream)",
    "LightningCLI._parse_ckpt_path": "where LightningCLI lets a checkpoint's hyper-parameters override the config",
    "lightning.fabric.strategies.deepspeed._validate_checkpoint_directory": "DeepSpeed's checkpoint-folder check",
    "lightning.fabric.strategies.model_parallel._rekey_optimizer_state_if_needed": "optimizer state saved by parameter id, keyed by name for FSDP2",
}


def training_clock_start(monitor: Any, default: float) -> float:
    """When Lightning's ``ThroughputMonitor`` started its training clock (moved on past validation)."""
    from lightning.pytorch.trainer.states import RunningStage

    return getattr(monitor, "_t0s", {}).get(RunningStage.TRAINING, default)


def logs_this_step(trainer: Any) -> bool:
    """Whether the trainer logs at this batch (an optimizer step, and its ``log_every_n_steps`` is due)."""
    return not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs


def log_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Log ``metrics`` at the trainer's logging step, the way Lightning's own ``ThroughputMonitor`` does."""
    trainer._logger_connector.log_metrics(metrics)


def fit_dataloader(trainer: Any) -> Optional[Any]:
    """The fit loop's training dataloader, when it is defined yet."""
    source = trainer.fit_loop._data_source
    return source.dataloader() if source.is_defined() else None


def batches_read_this_epoch(trainer: Any) -> int:
    """Training batches the fit loop has read in the current epoch (0 outside training)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer.training else 0


def validate_deepspeed_checkpoint_directory(path: Any) -> None:
    """Lightning's check that ``path`` is a DeepSpeed checkpoint folder (a clear error when not)."""
    from lightning.fabric.strategies.deepspeed import _validate_checkpoint_directory

    _validate_checkpoint_directory(path)


def rekey_optimizer_state(optimizer_state: dict, module: Any) -> dict:
    """An optimizer state that Lightning saved keyed by parameter id (``ModelParallelStrategy``), keyed
    by parameter name as ``torch.distributed.checkpoint.set_optimizer_state_dict`` expects."""
    from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed

    return _rekey_optimizer_state_if_needed(optimizer_state, module)
