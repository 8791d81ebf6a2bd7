"""A run killed with SIGKILL resumes with ``--ckpt_path last`` and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_BACKBONE_KWARGS


def stage1_config(tmp_path: Path, data: Path, name: str) -> Path:
    """A tiny stage-1 run of 12 steps without randomness beyond the seeded data stream."""
    run = tmp_path / name
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 12, "logger": False, "enable_progress_bar": False,
            "check_val_every_n_epoch": None, "val_check_interval": 12, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "default_root_dir": str(run),
            "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(run / "checkpoints"), "filename": "step{step}", "auto_insert_metric_name": False, "every_n_train_steps": 4, "save_top_k": -1, "save_last": True},
            }],
        },
        "model": {
            "class_path": "fineregion_pl.Stage1Module",
            "init_args": {
                "encoder": {"feature_levels": [1, 2], "backbone_kwargs": dict(TINY_BACKBONE_KWARGS, drop_path_rate=0.0)},
                "masking": "hard", "lr": 0.003, "warmup_steps": 2,
            },
        },
        "data": {"data_dirs": [str(data)], "image_size": 64, "batch_size": 4, "num_workers": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *extra: str, wait: bool = True):
    command = [sys.executable, "-m", "fineregion_pl", "fit", "--config", str(config), *extra]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(synthetic_data, tmp_path):
    fit(stage1_config(tmp_path, synthetic_data, "straight"))
    expected = final_weights(tmp_path / "straight")

    config = stage1_config(tmp_path, synthetic_data, "killed")
    process = fit(config, wait=False)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step8.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), process.stderr.read()[-2000:] if process.poll() is not None else "no checkpoint in time"
    os.kill(process.pid, signal.SIGKILL)  # mid-epoch: an epoch here is 24 steps
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    for path in (tmp_path / "killed" / "checkpoints").glob("*.ckpt"):  # nothing half-written under a final name
        torch.load(path, weights_only=True)
    # last.ckpt is step 8 (or still step 4 if the kill came between writing step8.ckpt and last.ckpt)
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] in (4, 8)

    fit(config, "--ckpt_path", "last")
    resumed = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert resumed["global_step"] == 12
    # same data, same order, same optimizer state: the weights agree to float round-off
    for key, value in expected.items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
