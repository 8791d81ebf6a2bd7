"""A lost rank in a 2-process DDP run: the other stops within the collective timeout, with a clear
message, and the run resumes from its last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from tiny_runs import stage1_overlay, write_yaml


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(SCRIPTS))


def command(overlay: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fineregion_pl", "fit", "--config", "configs/quickstart/stage1.yaml", "--config", str(overlay),
        "--config", "configs/strategies/ddp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy.init_args.timeout", "0:00:30", *extra,
    ]


def children(pid: int) -> list[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in listed]


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_within_two_minutes_and_the_run_resumes(synthetic_data, tmp_path):
    out = tmp_path / "run"
    config = stage1_overlay(out, synthetic_data, max_steps=100000)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=3, save_last=True)
    overlay = write_yaml(tmp_path / "tiny.yaml", config)
    run = subprocess.Popen(command(overlay), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), run.stderr.read()[-3000:] if run.poll() is not None else "no checkpoint within 5 min"
    time.sleep(1.0)
    ranks = [p for p in children(run.pid) if "fineregion_pl" in Path(f"/proc/{p}/cmdline").read_text()]
    assert ranks, "rank 1 (a child process launched by Lightning) not found"
    os.kill(ranks[0], signal.SIGKILL)
    killed_at = time.time()
    _, stderr = run.communicate(timeout=180)
    stopped_after = time.time() - killed_at
    assert run.returncode != 0
    assert stopped_after < 120, f"rank 0 took {stopped_after:.0f} s to stop"
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("fineregion-pl: error: a training process was lost"), stderr[-3000:]
    assert "--ckpt_path last" in last_line

    stopped = torch.load(last, weights_only=True)["global_step"]
    assert stopped >= 3
    resumed = subprocess.run(command(overlay, "--ckpt_path", "last", "--trainer.max_steps", str(stopped + 3)),
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == stopped + 3
