"""Tiny overlay configs for tests that run the real CLI (``fineregion-pl fit``) in other processes.

Each function returns a config dict to write as YAML and pass as a second ``--config`` after a
quickstart config: the same recipe, at the sizes of the test fixtures (64 px synthetic shards,
the 1-layer test LM, a few steps), writing everything under one folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

QUIET_TRAINER = dict(
    logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    limit_val_batches=0, check_val_every_n_epoch=None, log_every_n_steps=1,
)


def checkpoint_callback(dirpath: Path, every: int) -> dict[str, Any]:
    """A ModelCheckpoint that keeps one file, written every ``every`` steps."""
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(dirpath), "filename": "step{step}", "auto_insert_metric_name": False,
                      "every_n_train_steps": every, "save_top_k": 1, "save_last": False},
    }


def tiny_data(data_dir: Path) -> dict[str, Any]:
    return {"data_dirs": [str(data_dir)], "image_size": 64, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "max_regions": 4}


def stage1_overlay(out: Path, data_dir: Path, max_steps: int, extra_callbacks: Optional[list] = None) -> dict[str, Any]:
    """Over ``configs/quickstart/stage1.yaml``: the tiny Swin of ``tests/conftest.py``."""
    return {
        "trainer": dict(QUIET_TRAINER, max_steps=max_steps, val_check_interval=max_steps, default_root_dir=str(out),
                        callbacks=[checkpoint_callback(out / "checkpoints", max_steps), *(extra_callbacks or [])]),
        "model": {"init_args": {
            "encoder": {"backbone": "swin_tiny_patch4_window7_224", "pretrained": False, "feature_levels": [1, 2],
                        "backbone_kwargs": {"embed_dim": 16, "depths": [1, 1, 1], "num_heads": [1, 2, 4], "window_size": 4, "img_size": 64}},
            "head_hidden": 32, "attn_dim": 16, "warmup_steps": 1,
        }},
        "data": tiny_data(data_dir),
    }


def stage2_overlay(out: Path, data_dir: Path, lm_dir: Path, stage1: Path, max_steps: int, extra_callbacks: Optional[list] = None) -> dict[str, Any]:
    """Over ``configs/quickstart/stage2.yaml``: the test LM, a stage-1 checkpoint, small prompt."""
    return {
        "trainer": dict(QUIET_TRAINER, max_steps=max_steps, val_check_interval=max_steps, default_root_dir=str(out),
                        callbacks=[checkpoint_callback(out / "checkpoints", max_steps), *(extra_callbacks or [])]),
        "model": {"init_args": {
            "init_from": str(stage1), "language_model": {"name_or_path": str(lm_dir)},
            "prompt_hidden": 32, "warmup_steps": 1, "max_new_tokens": 4, "results_dir": str(out),
        }},
        "data": tiny_data(data_dir),
    }


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
