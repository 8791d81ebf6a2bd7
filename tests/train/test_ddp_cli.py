"""``fineregion-pl fit`` under real 2-process DDP (Lightning, CPU, gloo) with ``configs/strategies/ddp.yaml``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from tiny_runs import stage2_overlay, write_yaml

from fineregion_pl.model.checkpoint_files import read_checkpoint


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: our test scripts importable, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.mark.slow
def test_stage2_fit_on_two_ddp_ranks_keeps_them_identical(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path):
    out = tmp_path / "run"
    dumps = tmp_path / "dumps"
    dump = {"class_path": "rank_state_dump.RankStateDump", "init_args": {"out_dir": str(dumps)}}
    overlay = write_yaml(tmp_path / "tiny.yaml", stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, max_steps=3, extra_callbacks=[dump]))
    done = subprocess.run(
        [sys.executable, "-m", "fineregion_pl", "fit", "--config", "configs/quickstart/stage2.yaml", "--config", str(overlay),
         "--config", "configs/strategies/ddp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = {(r, when): torch.load(dumps / f"rank{r}-{when}.pt", weights_only=True) for r in (0, 1) for when in ("start", "end")}
    end0, end1 = ranks[0, "end"], ranks[1, "end"]
    assert end0.keys() == end1.keys()
    differing = [k for k in end0 if not torch.equal(end0[k], end1[k])]
    assert not differing, f"ranks hold different weights after DDP training: {differing[:5]}"
    # the two ranks read different images; training moved the trained weights (LoRA, prompt, encoder)
    changed = [k for k in end0 if not torch.equal(end0[k], ranks[0, "start"][k])]
    assert any(".lora_" in k for k in changed) and any(k.startswith("model.prompt.") for k in changed) and any(k.startswith("model.vision.encoder.") for k in changed)
    # the quickstart recipe trains the category head too (classification_weight > 0)
    assert any(k.startswith("model.vision.head.") for k in changed)

    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["step3.ckpt"], files  # one checkpoint, written by rank 0 only
    saved = read_checkpoint(out / "checkpoints" / "step3.ckpt")
    assert saved["global_step"] == 3
    state = saved["state_dict"]
    assert not any("base_layer" in k or "embed_tokens" in k for k in state)  # frozen LM left out
    for key, value in state.items():
        assert torch.equal(value, end0[key]), key
