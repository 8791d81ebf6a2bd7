"""``configs/strategies/fsdp2.yaml`` (FSDP2 ``fully_shard`` via Lightning's ModelParallelStrategy) on 2 CPU ranks over gloo.

Trains stage 2 in bf16-mixed, saves one checkpoint file without the frozen base LM, resumes from
it, and the file serves ``test`` and ``RegionCaptioner.from_checkpoint``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_ddp_cli import cli_env
from tiny_runs import stage2_overlay, write_yaml

from fineregion_pl.model.checkpoint_files import read_checkpoint


def fit(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fineregion_pl", "fit", *args, "--config", "configs/strategies/fsdp2.yaml",
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "bf16-mixed"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow
def test_fsdp2_trains_saves_and_resumes_stage2_on_two_cpu_ranks(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path):
    out = tmp_path / "run"
    dumps = tmp_path / "dumps"
    dump = {"class_path": "rank_state_dump.RankStateDump", "init_args": {"out_dir": str(dumps)}}
    overlay = write_yaml(tmp_path / "tiny.yaml", stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, max_steps=2, extra_callbacks=[dump]))
    done = fit(["--config", "configs/quickstart/stage2.yaml", "--config", str(overlay)], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    ckpt = out / "checkpoints" / "step2.ckpt"
    saved = read_checkpoint(ckpt)
    assert saved["global_step"] == 2
    state = saved["state_dict"]
    assert not any("base_layer" in k or "embed_tokens" in k for k in state)  # frozen LM left out
    assert any(".lora_" in k for k in state) and any(k.startswith("model.vision.encoder.") for k in state)
    # the gathered file holds full tensors, equal to what the ranks hold at the end
    end0 = torch.load(dumps / "rank0-end.pt", weights_only=True)
    start0 = torch.load(dumps / "rank0-start.pt", weights_only=True)
    lora = [k for k in state if ".lora_B" in k]
    assert lora and all(torch.allclose(state[k].float(), end0[k].float()) for k in lora)
    assert any(not torch.equal(end0[k], start0[k]) for k in lora), "training did not move the LoRA weights"

    # resume from the file for two more steps
    overlay4 = write_yaml(tmp_path / "tiny4.yaml", stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, max_steps=4))
    resumed = fit(["--config", "configs/quickstart/stage2.yaml", "--config", str(overlay4), "--ckpt_path", str(ckpt)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    final = read_checkpoint(out / "checkpoints" / "step4.ckpt")
    assert final["global_step"] == 4
    # the optimizer state came back from the file: AdamW counts 4 steps, not 2
    steps = {float(v["step"]) for v in final["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}, steps

    from fineregion_pl.model.captioner import RegionCaptioner

    model = RegionCaptioner.from_checkpoint(out / "checkpoints" / "step4.ckpt")
    assert torch.isfinite(next(model.parameters())).all()
