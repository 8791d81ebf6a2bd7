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

from fineregion_pl.commands.convert_zero import convert_zero
from fineregion_pl.model.checkpoint_files import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from tiny_runs import stage1_overlay, stage2_overlay, write_yaml


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
    assert any(".lora_A." in k for k in names) and any(k.startswith("model.prompt.") for k in names) and any(k.startswith("model.vision.encoder.") for k in names)
    assert not any(k.startswith("model.vision.head.") or "base_layer" in k or "embed_tokens" in k for k in names)

    # the checkpoint folder holds the trained weights only: no frozen base LM, no frozen stage-1 head
    model_states = torch.load(zero2_run / "zero" / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    saved = set(model_states["module"])
    assert not any("base_layer" in k or "embed_tokens" in k or k.startswith("model.vision.head.") for k in saved)
    assert {k for k in saved if ".lora_" in k} == {k for k in names if ".lora_" in k}


@pytest.mark.slow
def test_converted_zero_checkpoint_loads_into_stage2_with_the_trained_weights(zero2_run, stage1_checkpoint, tmp_path):
    from jsonargparse import auto_cli
    from PIL import Image

    from fineregion_pl.api import RegionCaptioner
    from fineregion_pl.commands.export import VISION_WEIGHTS, export

    converted = tmp_path / "stage2-fp32.ckpt"
    # the command line `fineregion-pl convert-zero` runs: the function through jsonargparse
    assert auto_cli(convert_zero, args=["--ckpt_dir", str(zero2_run / "zero"), "--out", str(converted), "--trust_pickle", "true"]) == converted

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
    assert heads and all(torch.equal(state["model.vision." + k[len("model."):]], stage1[k]) for k in heads)
    with pytest.raises(ValueError, match="give --init_from PATH"):  # the stage-1 file moved: say what to do
        convert_zero(ckpt_dir=str(zero2_run / "zero"), out=str(tmp_path / "other.ckpt"), init_from=str(tmp_path / "moved.ckpt"), trust_pickle=True)

    captioner = RegionCaptioner.from_checkpoint(converted)
    loaded = dict(captioner.named_parameters())
    assert all(torch.equal(loaded[k[len("model."):]], v) for k, v in trained.items())
    image = Image.new("RGB", (64, 64), "white")
    rows = captioner.describe(image, [[4, 4, 40, 40], [20, 30, 60, 60]])
    assert [r["region_id"] for r in rows] == [0, 1] and all(isinstance(r["caption"], str) for r in rows)

    exported = export(ckpt_path=str(converted), out=str(tmp_path / "export"))
    from safetensors.torch import load_file

    vision = load_file(str(exported / VISION_WEIGHTS))
    assert all(torch.equal(vision[k[len("model."):]], v) for k, v in trained.items() if k.startswith(("model.prompt.", "model.vision.")))
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
        pytest.fail(result["error"])
    assert result["partitioned"] == result["lm_params"] > 0
    assert result["embedding_matches"]  # from_pretrained loaded the shards (HfDeepSpeedConfig is set)
    assert result["prompt_width"] == result["hidden_size"]
    assert result["prompt_scale"] == pytest.approx(result["embedding_rms"], rel=1e-4)
    assert result["lora_b_max"] == 0.0  # LoRA-B starts at zero on ZeRO-3 partitions too


def cpu_deepspeed_config(tmp_path: Path) -> Path:
    """``configs/strategies/deepspeed_zero2.yaml`` with the test-only CPU subclass of its strategy."""
    config = yaml.safe_load((ROOT / "configs/strategies/deepspeed_zero2.yaml").read_text())
    config["trainer"]["strategy"]["class_path"] = "cpu_deepspeed.CPUDeepSpeedStrategy"
    config["trainer"]["strategy"]["init_args"]["process_group_backend"] = "gloo"
    return write_yaml(tmp_path / "deepspeed_cpu.yaml", config)


def cli_fit(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run([sys.executable, "-m", "fineregion_pl", "fit", *args, "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def dump_callback(folder: Path) -> dict:
    return {"class_path": "rank_state_dump.RankStateDump", "init_args": {"out_dir": str(folder)}}


@pytest.mark.slow
def test_lightning_deepspeed_checkpoint_resumes_and_converts(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path):
    """The real Lightning path with ``configs/strategies/deepspeed_zero2.yaml`` (CUDA checks lifted by
    tests/scripts/cpu_deepspeed.py): fit saves a ZeRO folder without frozen weights, a second fit
    resumes from it (as SLURM's requeue does), and the folder converts."""
    strategy = cpu_deepspeed_config(tmp_path)
    out = tmp_path / "run"

    def fit(steps: int, *extra: str) -> None:
        overlay = stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, steps, [dump_callback(tmp_path / f"dumps{steps}")])
        overlay["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
        overlay_file = write_yaml(tmp_path / f"tiny{steps}.yaml", overlay)
        cli_fit("--config", "configs/quickstart/stage2.yaml", "--config", str(overlay_file), "--config", str(strategy), *extra)

    fit(2)
    first = out / "checkpoints" / "step2.ckpt"
    assert (first / "latest").is_file()
    fit(4, "--ckpt_path", str(first))
    end2 = torch.load(tmp_path / "dumps2" / "rank0-end.pt", weights_only=True)
    start4 = torch.load(tmp_path / "dumps4" / "rank0-start.pt", weights_only=True)
    end4 = torch.load(tmp_path / "dumps4" / "rank0-end.pt", weights_only=True)
    trained = [k for k in end2 if ".lora_" in k or k.startswith(("model.prompt.", "model.vision.encoder."))]
    assert all(torch.equal(start4[k], end2[k]) for k in trained)  # resumed from the folder
    assert any(not torch.equal(end4[k], end2[k]) for k in trained)  # and trained on

    converted = convert_zero(ckpt_dir=str(out / "checkpoints" / "step4.ckpt"), out=str(tmp_path / "step4.ckpt"), trust_pickle=True)
    checkpoint = read_checkpoint(converted)
    assert checkpoint["global_step"] == 4 and "loops" in checkpoint
    assert not any("base_layer" in k or "embed_tokens" in k for k in checkpoint["state_dict"])
    assert all(torch.equal(checkpoint["state_dict"][k], end4[k]) for k in trained)


@pytest.mark.slow
def test_converted_stage1_zero_checkpoint_is_a_stage2_init_from(synthetic_data, tiny_lm, tmp_path):
    """Stage 1 under DeepSpeed with a frozen encoder stage: the converted file holds every weight,
    the frozen ones rebuilt as the run built them, and stage 2 starts from it."""
    from fineregion_pl.model.language_model import LanguageModelConfig
    from fineregion_pl.train.stage2 import Stage2Module

    overlay = stage1_overlay(tmp_path / "run", synthetic_data, 2, [dump_callback(tmp_path / "dumps")])
    overlay["model"]["init_args"]["encoder"]["freeze_stages"] = 1
    cli_fit("--config", "configs/quickstart/stage1.yaml", "--config", str(write_yaml(tmp_path / "tiny.yaml", overlay)),
            "--config", str(cpu_deepspeed_config(tmp_path)))
    converted = convert_zero(ckpt_dir=str(tmp_path / "run" / "checkpoints" / "step2.ckpt"), out=str(tmp_path / "stage1.ckpt"), trust_pickle=True)
    state = read_checkpoint(converted)["state_dict"]
    end = torch.load(tmp_path / "dumps" / "rank0-end.pt", weights_only=True)
    assert state.keys() == end.keys()
    differing = [k for k in end if not torch.equal(state[k], end[k])]
    assert not differing, differing[:5]  # trained weights from the shards, frozen ones rebuilt with the run's seed
    stage2 = Stage2Module(language_model=LanguageModelConfig(name_or_path=str(tiny_lm)), init_from=str(converted), prompt_hidden=16)
    stage2.setup("fit")  # as the Trainer does before training: the stage-1 weights go in
    vision = stage2.model.vision.state_dict()
    assert all(torch.equal(vision[k[len("model."):]], v) for k, v in state.items() if k.startswith("model."))


def fit_recipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``fineregion-pl fit`` run from ``cwd`` (the recipe's relative ``runs/...`` paths land there) on the CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "fineregion_pl", "fit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def shifted_stage1_checkpoint(synthetic_data, tmp_path_factory) -> Path:
    """A stage-1 checkpoint whose Swin has shifted windows (two blocks a stage): its blocks hold the
    float ``attn_mask`` buffer that a bf16 engine must cast with the weights."""
    import lightning as L
    from conftest import TINY_BACKBONE_KWARGS, tiny_encoder_config, tiny_trainer

    from fineregion_pl import RegionDataModule, Stage1Module

    L.seed_everything(0)
    out = tmp_path_factory.mktemp("stage1_shifted")
    encoder = tiny_encoder_config(backbone_kwargs=dict(TINY_BACKBONE_KWARGS, depths=[2, 2, 2]))
    module = Stage1Module(encoder=encoder, num_classes=5, categories=["circle", "square", "triangle", "diamond", "cross"])
    assert any(name.endswith("attn_mask") and b is not None for name, b in module.named_buffers())
    trainer = tiny_trainer(out, max_steps=1, enable_checkpointing=False)
    trainer.fit(module, RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0))
    trainer.save_checkpoint(out / "stage1.ckpt")
    return out / "stage1.ckpt"


@pytest.mark.slow
def test_the_gpu_recipe_trains_two_bf16_steps_through_the_deepspeed_engine(synthetic_data, tiny_lm, shifted_stage1_checkpoint, tmp_path):
    """``configs/stage2.yaml`` + ``configs/strategies/deepspeed_zero2.yaml`` as documented (bf16-mixed,
    dtype auto, gradient checkpointing, every loss on), with only the machine-specific overrides:
    the CPU, local model paths, the shards (and the tiny model's input size)."""
    strategy = cpu_deepspeed_config(tmp_path)
    machine = [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--model.init_args.init_from", str(shifted_stage1_checkpoint), "--model.init_args.language_model.name_or_path", str(tiny_lm),
        "--data.data_dirs", f"[{synthetic_data}]", "--data.weights", "[1.0]", "--data.num_workers", "0", "--data.image_size", "64",
    ]
    done = fit_recipe(tmp_path, "--config", str(ROOT / "configs/stage2.yaml"), "--config", str(strategy), *machine)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = tmp_path / "runs" / "stage2" / "checkpoints" / "last.ckpt"
    model_states = torch.load(saved / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert model_states["global_steps"] == 2
    weights = model_states["module"]
    assert {v.dtype for k, v in weights.items() if ".lora_" in k} == {torch.bfloat16}  # DeepSpeed trained in bf16
    assert not any("base_layer" in k or "embed_tokens" in k for k in weights)
    # a recipe overridden to one shard set keeps its two weights: one line, naming what to change
    wrong = fit_recipe(tmp_path, "--config", str(ROOT / "configs/stage2.yaml"), *machine[:-8], "--data.data_dirs", f"[{synthetic_data}]")
    assert wrong.returncode != 0
    assert wrong.stderr.strip().splitlines()[-1].startswith("fineregion-pl: error: data.weights has 2 entries for 1 data_dirs"), wrong.stderr[-2000:]


@pytest.mark.slow
def test_a_zero_checkpoint_of_a_tied_embedding_lm_holds_no_frozen_alias(synthetic_data, stage1_checkpoint, tmp_path):
    """GPT-2 ties ``lm_head.weight`` to the frozen ``wte.weight``: neither may stay in the ZeRO folder."""
    from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts

    lm = tmp_path / "gpt2"
    build_tiny_lm(lm, synthetic_pretraining_texts(0, 50), hidden_size=32, num_layers=1, num_heads=2, steps=2, progress=False, family="gpt2")
    out = tmp_path / "run"
    overlay = write_yaml(tmp_path / "tiny.yaml", stage2_overlay(out, synthetic_data, lm, stage1_checkpoint, 2))
    cli_fit("--config", "configs/quickstart/stage2.yaml", "--config", str(overlay), "--config", str(cpu_deepspeed_config(tmp_path)))
    folder = next((out / "checkpoints").glob("*.ckpt"))
    saved = torch.load(folder / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert any(".lora_" in k for k in saved)
    assert not [k for k in saved if k.endswith(("lm_head.weight", "wte.weight", "wpe.weight"))]
    converted = convert_zero(ckpt_dir=str(folder), out=str(tmp_path / "converted.ckpt"), trust_pickle=True)
    assert any(".lora_" in k for k in read_checkpoint(converted)["state_dict"])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: ZeRO-3 on the CPU engine gets past its optimizer (cast_unpartitioned_parameters) but the first "
                   "forward fails in DeepSpeed's zero3_linear_wrap inside a peft LoRA layer ('size mismatch, got input (180), mat (180x32), vec (0)': "
                   "a partitioned bias not gathered); see docs/scaling.md. strict: this test fails loudly once ZeRO-3 trains")
def test_zero3_trains_two_bf16_steps_and_saves_a_folder_without_the_frozen_lm(synthetic_data, tiny_lm, stage1_checkpoint, tmp_path):
    """``deepspeed_zero3.yaml`` (weights sharded, the LM built inside ``zero.Init``) through DeepSpeed's engine on the CPU, bf16-mixed."""
    config = yaml.safe_load((ROOT / "configs/strategies/deepspeed_zero3.yaml").read_text())
    config["trainer"]["strategy"]["class_path"] = "cpu_deepspeed.CPUDeepSpeedStrategy"
    config["trainer"]["strategy"]["init_args"]["process_group_backend"] = "gloo"
    strategy = write_yaml(tmp_path / "zero3_cpu.yaml", config)
    out = tmp_path / "run"
    overlay = write_yaml(tmp_path / "tiny.yaml", stage2_overlay(out, synthetic_data, tiny_lm, stage1_checkpoint, 2))
    cli_fit("--config", "configs/quickstart/stage2.yaml", "--config", str(overlay), "--config", str(strategy), "--trainer.precision", "bf16-mixed")
    folder = next((out / "checkpoints").glob("*.ckpt"))
    states = list((folder / "checkpoint").glob("*model_states.pt"))
    assert states, sorted(p.name for p in (folder / "checkpoint").iterdir())
    converted = read_checkpoint(convert_zero(ckpt_dir=str(folder), out=str(tmp_path / "converted.ckpt")))
    lora = {k: v for k, v in converted["state_dict"].items() if ".lora_" in k}
    assert lora and all(v.numel() > 0 for v in lora.values())  # gathered from the shards, not empty placeholders
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # two steps moved LoRA-B off its zero start
    assert not any("base_layer" in k or "embed_tokens" in k for k in converted["state_dict"])
