"""A NaN loss on one rank of a 2-process DDP run stops every rank at that step with a clear line,
instead of leaving the healthy rank waiting in the gradient all-reduce until the collective timeout."""

from __future__ import annotations

import subprocess
import time

import pytest
from test_lost_rank import ROOT, command, env
from tiny_runs import stage1_overlay, write_yaml


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_stops_both_ranks_at_once(synthetic_data, tmp_path):
    out = tmp_path / "run"
    poison = {"class_path": "poison_rank.PoisonRank", "init_args": {"rank": 1, "step": 2}}
    overlay = write_yaml(tmp_path / "tiny.yaml", stage1_overlay(out, synthetic_data, max_steps=50, extra_callbacks=[poison]))
    began = time.time()
    # a 10-minute collective timeout: only the agreed stop can end this run within the assertion's bound
    run = subprocess.run([*command(overlay), "--trainer.strategy.init_args.timeout", "0:10:00"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=400)
    seconds = time.time() - began
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("fineregion-pl: error: ")]
    assert any(line.startswith("fineregion-pl: error: training loss is nan at step 2") for line in errors), run.stderr[-3000:]  # rank 1
    assert any(line.startswith("fineregion-pl: error: training loss is non-finite on another rank at step 2") for line in errors), run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] in errors, run.stderr[-3000:]
    assert seconds < 240, f"the run took {seconds:.0f} s to stop"
    assert not list((out / "checkpoints").glob("*.ckpt")), "no checkpoint of the poisoned weights may be written"
