"""The private Lightning attributes the package uses (fineregion_pl/lightning_private.py) still exist.

When a Lightning release moves one of them, this test fails before any run does: update
``lightning_private.py`` and the upper bound of ``lightning`` in pyproject.toml together.
"""

from __future__ import annotations

import lightning
from lightning.fabric.strategies import deepspeed as fabric_deepspeed
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops import _FitLoop, _TrainingEpochLoop
from lightning.pytorch.trainer.connectors.logger_connector import _LoggerConnector

from fineregion_pl.lightning_private import PRIVATE_NAMES


def test_every_private_attribute_is_where_the_package_reads_it(tmp_path):
    monitor = ThroughputMonitor(batch_size_fn=len)
    trainer = lightning.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert hasattr(monitor, "_t0s")
    assert callable(_FitLoop._should_accumulate) and hasattr(trainer.fit_loop, "_data_source")
    assert hasattr(trainer.fit_loop.epoch_loop, "batch_progress") and isinstance(_TrainingEpochLoop, type)
    assert isinstance(trainer._logger_connector, _LoggerConnector) and hasattr(_LoggerConnector, "should_update_logs") and callable(_LoggerConnector.log_metrics)
    assert callable(LightningCLI._parse_ckpt_path)
    assert callable(fabric_deepspeed._validate_checkpoint_directory)
    from lightning.fabric.strategies import model_parallel

    assert callable(model_parallel._rekey_optimizer_state_if_needed)
    assert len(PRIVATE_NAMES) == 8
