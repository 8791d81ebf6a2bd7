"""The ``fineregion-pl`` command: verbs, configs, and a tiny quickstart end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fineregion_pl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_verb():
    out = run("--help")
    assert out.returncode == 0
    for verb in ("fit", "validate", "test", "predict", "quickstart"):
        assert f"  {verb} " in out.stdout


def test_unknown_verb_is_a_one_line_error():
    out = run("train")
    assert out.returncode == 2
    assert "unknown verb 'train'" in out.stderr


def test_print_config_of_quickstart_stage2_is_complete():
    out = run("fit", "--config", "configs/quickstart/stage2.yaml", "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    config = yaml.safe_load(out.stdout)
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "fineregion_pl.Stage2Module"
    assert init["language_model"]["lora"]["r"] == 8
    assert init["prompt_mode"] == "adaptive" and "consistency_weight" in init and "dynamic" in init
    assert set(init["dynamic"]) >= {"box_jitter", "box_scale"}
    assert config["data"]["data_dirs"] == ["runs/quickstart/data"]
    assert config["trainer"]["max_steps"] == 600


@pytest.mark.slow
def test_quickstart_runs_end_to_end_at_tiny_size(tmp_path):
    workdir = tmp_path / "qs"
    out = run(
        "quickstart", "--workdir", str(workdir), "--train_images", "64", "--val_images", "16", "--test_images", "16",
        "--stage1_steps", "4", "--stage2_steps", "4", "--lm_steps", "10", timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    for key in ("accuracy", "macro_f1"):
        assert 0.0 <= results["classification"][key] <= 1.0
    for key in ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L"):
        assert isinstance(results["caption"][key], float)
    assert "no_region_control" in results
    assert (workdir / "stage1" / "checkpoints" / "last.ckpt").is_file()
    assert (workdir / "configs" / "stage2.yaml").is_file()
    assert "| classification | accuracy |" in out.stdout
    pictures = sorted((workdir / "pictures" / "images").glob("*.png"))
    assert len(pictures) == 8  # the default: the first 8 test images, regions and captions drawn
    drawn = [json.loads(line) for line in (workdir / "pictures" / "predictions.jsonl").read_text().splitlines()]
    assert {row["image_id"] for row in drawn} == {p.stem for p in pictures}
