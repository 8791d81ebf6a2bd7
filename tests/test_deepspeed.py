"""DeepSpeed on this CPU: ZeRO-2 trains the stage-2 weights over gloo, its checkpoint converts
(``convert_zero``) into a Lightning checkpoint that stage 2 loads, exports and captions with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fineregion_pl.checkpoints import read_checkpoint
from fineregion_pl.zero_checkpoint import convert_zero

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from tiny_runs import stage2_overlay, write_yaml  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, args: list[str], world_size: int, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """``script`` once per rank, as a launcher would start it (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


@pytest.fixture(scope="module")
def zero2_run(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path_factory) -> Path:
    """Two gloo ranks train stage 2 for 8 steps with DeepSpeed's ZeRO-2 engine and save a checkpoint."""
    out = tmp_path_factory.mktemp("zero2")
    done = run_ranks(SCRIPTS / "deepspeed_stage2_probe.py", [str(synthetic_data), str(tiny_lm), str(stage1_checkpoint), str(out), "8"], world_size=2)
    for rank, result in enumerate(done):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_zero2_trains_the_stage2_weights_on_two_gloo_ranks(zero2_run):
    runs = [json.loads((zero2_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert set(runs[0]["image_ids"]).isdisjoint(runs[1]["image_ids"])  # each rank its own images
    for run in runs:
        losses = run["losses"]
        assert losses[-1] < 0.7 * losses[0], losses
    weights = [torch.load(zero2_run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # ZeRO-2 keeps the replicas equal
    names = list(weights[0])
    assert any(".lora_A." in k for k in names) and any(k.startswith("prompt.") for k in names) and any(k.startswith("vision.encoder.") for k in names)
    assert not any(k.startswith("vision.head.") or "base_layer" in k or "embed_tokens" in k for k in names)

    # the checkpoint folder holds the trained weights only: no frozen base LM, no frozen stage-1 head
    model_states = torch.load(zero2_run / "zero" / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    saved = set(model_states["module"])
    assert not any("base_layer" in k or "embed_tokens" in k or k.startswith("vision.head.") for k in saved)
    assert {k for k in saved if ".lora_" in k} == {k for k in names if ".lora_" in k}


@pytest.mark.slow
def test_converted_zero_checkpoint_loads_into_stage2_with_the_trained_weights(zero2_run, stage1_checkpoint, tmp_path):
    from jsonargparse import auto_cli
    from PIL import Image

    from fineregion_pl.api import RegionCaptioner
    from fineregion_pl.export import VISION_WEIGHTS, export

    converted = tmp_path / "stage2-fp32.ckpt"
    # the command line `fineregion-pl convert-zero` runs: the function through jsonargparse
    assert auto_cli(convert_zero, args=["--ckpt_dir", str(zero2_run / "zero"), "--out", str(converted)]) == converted

    checkpoint = read_checkpoint(converted)  # torch.load(weights_only=True): only tensors and plain values
    assert not {"module", "optimizer", "ds_config", "param_shapes", "buffer_names"} & set(checkpoint)
    assert checkpoint["global_step"] == 8 and checkpoint["frozen_lm_from"] == checkpoint["hyper_parameters"]["language_model"]["name_or_path"]
    state = checkpoint["state_dict"]
    trained = torch.load(zero2_run / "rank0.pt", weights_only=True)
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    assert not any("base_layer" in k or "embed_tokens" in k for k in state)
    # the frozen stage-1 head, left out of the ZeRO folder, comes back from the stage-1 checkpoint
    stage1 = read_checkpoint(stage1_checkpoint)["state_dict"]
    heads = [k for k in stage1 if k.startswith("model.head.")]
    assert heads and all(torch.equal(state["vision." + k[len("model."):]], stage1[k]) for k in heads)

    try:
        captioner = RegionCaptioner.from_checkpoint(converted)
    except Exception as err:  # noqa: BLE001 - only the known gap is expected
        if "lm_head.weight" in str(err):
            pytest.xfail("Stage2Module.frozen_lm_keys does not count tied LM weights (lm_head = embed_tokens) as frozen: "
                         "use named_parameters(remove_duplicate=False) (see docs/scaling.md)")
        raise
    loaded = dict(captioner.module.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())
    image = Image.new("RGB", (64, 64), "white")
    rows = captioner.describe(image, [[4, 4, 40, 40], [20, 30, 60, 60]])
    assert [r["region_id"] for r in rows] == [0, 1] and all(isinstance(r["caption"], str) for r in rows)

    exported = export(ckpt_path=str(converted), out=str(tmp_path / "export"))
    from safetensors.torch import load_file

    vision = load_file(str(exported / VISION_WEIGHTS))
    assert all(torch.equal(vision[k], v) for k, v in trained.items() if k.startswith("prompt.") or k.startswith("vision."))
    assert RegionCaptioner.from_export(exported).describe(image, [[4, 4, 40, 40], [20, 30, 60, 60]]) == rows


def test_convert_zero_refuses_what_is_not_a_zero_folder(tmp_path):
    single = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, single)
    with pytest.raises(ValueError, match="is a file"):
        convert_zero(ckpt_dir=str(single), out=str(tmp_path / "out.ckpt"))
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint folder.*'latest'"):
        convert_zero(ckpt_dir=str(tmp_path), out=str(tmp_path / "out.ckpt"))


@pytest.mark.slow
def test_zero3_builds_the_lm_sharded_in_configure_model(tiny_lm, stage1_checkpoint, tmp_path):
    """Lightning calls ``configure_model`` inside ``RegionDeepSpeedStrategy.model_sharded_context``:
    with ZeRO-3 the LM must come out partitioned, holding the pretrained weights, LoRA-B at zero."""
    out = tmp_path / "zero3.json"
    (done,) = run_ranks(SCRIPTS / "zero3_build_probe.py", [str(tiny_lm), str(stage1_checkpoint), str(out)], world_size=1)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    if "error" in result:
        if "IndexError" in result["error"]:
            pytest.xfail("RegionLanguageModel.hidden_size / embedding_rms read the embedding weight, an empty ZeRO-3 partition "
                         "inside zero.Init: use embedding_dim and gather it (see docs/scaling.md)")
        pytest.fail(result["error"])
    assert result["partitioned"] == result["lm_params"] > 0
    assert result["embedding_matches"]  # from_pretrained loaded the shards (HfDeepSpeedConfig is set)
    assert result["prompt_width"] == result["hidden_size"]
    assert result["prompt_scale"] == pytest.approx(result["embedding_rms"], rel=1e-4)
    if result["lora_b_max"] != 0.0:
        pytest.xfail("peft initialises LoRA in place; on ZeRO-3 partitions that is a no-op, so LoRA-B is not zero "
                     "(re-initialise under GatheredParameters: see docs/scaling.md)")


@pytest.mark.slow
def test_lightning_deepspeed_checkpoint_resumes_and_converts(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path):
    """The real Lightning path with ``configs/strategies/deepspeed_zero2.yaml`` (CUDA checks lifted by
    tests/scripts/cpu_deepspeed.py): fit saves a ZeRO folder without frozen weights, a second fit
    resumes from it (as SLURM's requeue does), and the folder converts."""
    config = yaml.safe_load((ROOT / "configs/strategies/deepspeed_zero2.yaml").read_text())
    config["trainer"]["strategy"]["class_path"] = "cpu_deepspeed.CPUDeepSpeedStrategy"
    config["trainer"]["strategy"]["init_args"]["process_group_backend"] = "gloo"
    strategy = write_yaml(tmp_path / "deepspeed_cpu.yaml", config)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p))

    def fit(steps: int, *extra: str) -> None:
        dump = {"class_path": "rank_state_dump.RankStateDump", "init_args": {"out_dir": str(tmp_path / f"dumps{steps}")}}
        overlay = write_yaml(tmp_path / f"tiny{steps}.yaml", stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, steps, [dump]))
        overlay_config = yaml.safe_load(overlay.read_text())
        overlay_config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
        write_yaml(overlay, overlay_config)
        done = subprocess.run(
            [sys.executable, "-m", "fineregion_pl", "fit", "--config", "configs/quickstart/stage2.yaml", "--config", str(overlay),
             "--config", str(strategy), "--trainer.accelerator", "cpu", "--trainer.devices", "1", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]

    fit(2)
    first = out / "checkpoints" / "step2.ckpt"
    assert (first / "latest").is_file()
    fit(4, "--ckpt_path", str(first))
    end2 = torch.load(tmp_path / "dumps2" / "rank0-end.pt", weights_only=True)
    start4 = torch.load(tmp_path / "dumps4" / "rank0-start.pt", weights_only=True)
    end4 = torch.load(tmp_path / "dumps4" / "rank0-end.pt", weights_only=True)
    trained = [k for k in end2 if ".lora_" in k or k.startswith("prompt.") or k.startswith("vision.encoder.")]
    assert all(torch.equal(start4[k], end2[k]) for k in trained)  # resumed from the folder
    assert any(not torch.equal(end4[k], end2[k]) for k in trained)  # and trained on

    converted = convert_zero(ckpt_dir=str(out / "checkpoints" / "step4.ckpt"), out=str(tmp_path / "step4.ckpt"))
    checkpoint = read_checkpoint(converted)
    assert checkpoint["global_step"] == 4 and "loops" in checkpoint
    assert not any("base_layer" in k or "embed_tokens" in k for k in checkpoint["state_dict"])
    assert all(torch.equal(checkpoint["state_dict"][k], end4[k]) for k in trained)
