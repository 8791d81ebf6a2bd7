"""``fineregion-pl test --data.protocol`` on 2 gloo ranks writes the numbers it writes on 1 (odd item count: padding would show).

Each run is a real ``python -m fineregion_pl test`` process; with ``devices: 2`` Lightning's DDP
launcher starts the second rank as another process and they merge over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from eval_fixtures import GLAMM_REFCOCOG, images_for, need_eval_fixtures
from torch.utils.data import DistributedSampler

ROOT = Path(__file__).resolve().parents[2]


def five_sentences(tmp_path: Path) -> Path:
    """GLaMM's RefCOCOg fixture without its last sentence: 5 items, so 2 ranks get 3 and 2."""
    data = json.loads(GLAMM_REFCOCOG.read_text())
    data["images"], data["annotations"] = data["images"][:5], data["annotations"][:5]
    path = tmp_path / "finetune_refcocog_val_captions.json"
    path.write_text(json.dumps(data))
    return path


def run_cli_test(tmp_path: Path, devices: int, annotation: Path, images: Path, stage1: Path, tiny_lm: Path, stage2: Path) -> Path:
    out = tmp_path / f"devices{devices}"
    config = {
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "fineregion_pl.Stage2Module", "init_args": {
            "init_from": str(stage1), "prompt_tokens": 2, "prompt_hidden": 32, "max_new_tokens": 6, "results_dir": str(out),
            "language_model": {"name_or_path": str(tiny_lm), "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}}},
        "data": {"image_size": 64, "batch_size": 2, "num_workers": 0, "protocol": "refcocog-regcap", "annotations": str(annotation),
                 "images": str(images)},  # scored with Java: PTB tokenizer and METEOR, as published numbers are
    }
    path = tmp_path / f"test{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "fineregion_pl", "test", "--config", str(path), "--ckpt_path", str(stage2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_gloo_ranks_write_the_numbers_of_one(tmp_path, stage1_checkpoint, tiny_lm, stage2_checkpoint):
    need_eval_fixtures()
    annotation = five_sentences(tmp_path)
    images = images_for(annotation, tmp_path / "images")
    # what the padding would do: torch's DistributedSampler gives 2 ranks 6 indices for 5 items
    assert sum(len(list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False))) for r in (0, 1)) == 6
    one = run_cli_test(tmp_path, 1, annotation, images, stage1_checkpoint, tiny_lm, stage2_checkpoint)
    two = run_cli_test(tmp_path, 2, annotation, images, stage1_checkpoint, tiny_lm, stage2_checkpoint)
    results = {n: json.loads((d / "results.json").read_text()) for n, d in ((1, one), (2, two))}
    assert results[1]["refcocog-regcap"] == results[2]["refcocog-regcap"]
    assert results[2]["refcocog-regcap"]["scored"] == results[2]["card"]["items"]["scored"] == 5
    assert (results[1]["card"]["world_size"], results[2]["card"]["world_size"]) == (1, 2)
    # two processes evaluated: rank 0 items 0, 2, 4 and rank 1 items 1, 3, merged on rank 0
    assert results[1]["card"]["rows_per_rank"] == [5] and results[2]["card"]["rows_per_rank"] == [3, 2]
    assert "METEOR" in results[2]["refcocog-regcap"] and results[2]["card"]["comparable"] is False  # 5 sentences, not the published set
    assert json.loads((one / "predictions.json").read_text()) == json.loads((two / "predictions.json").read_text())
