"""Shared helpers of the protocol tests: the published-format fixtures, images made for their sizes, a tiny test run.

The fixtures (``/work/shared/fixtures/eval_formats``, or ``$FINEREGION_FIXTURES/eval_formats``) are
a few real records and synthetic ones in each published format (``PROVENANCE.json`` says which),
without images; :func:`images_for` writes placeholder JPEGs of the sizes the file gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from convert_helpers import FIXTURES, placeholder_jpeg

EVAL = FIXTURES / "eval_formats"
GLAMM_REFCOCOG = EVAL / "refcocog_regcap" / "finetune_refcocog_val_captions.json"
GLAMM_RESULTS = EVAL / "refcocog_regcap" / "glamm_results"
MDETR_REC = EVAL / "rec" / "finetune_refcocog_val.json"
PROPOSALS = EVAL / "proposals" / "coco_det_results.sample.json"


def need_eval_fixtures() -> None:
    """Skip the calling test when the evaluation-format fixtures are not on this machine."""
    if not (EVAL / "FORMATS.md").is_file():
        pytest.skip(f"evaluation-format fixtures not found under {EVAL} (set FINEREGION_FIXTURES)")


def images_for(annotation: Path, out: Path) -> Path:
    """Placeholder JPEGs of the sizes ``annotation`` gives, under ``out`` by file name; returns ``out``."""
    if annotation.suffix == ".jsonl":
        entries = [json.loads(line) for line in annotation.read_text().splitlines() if line.strip()]
        images = [{"file_name": e["img_path"], "width": e["width"], "height": e["height"]} for e in entries]
    else:
        images = json.loads(annotation.read_text())["images"]
    for n, image in enumerate({i["file_name"]: i for i in images}.values()):
        if not (out / image["file_name"]).is_file():
            placeholder_jpeg(out / image["file_name"], image["width"], image["height"], seed=n)
    return out


def tiny_stage2(stage1_checkpoint: Path, tiny_lm: Path, results_dir: Path):
    """A Stage2Module with the architecture of ``tests/conftest.py``'s ``stage2_checkpoint``."""
    from fineregion_pl import Stage2Module
    from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings

    language = LanguageModelConfig(name_or_path=str(tiny_lm), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    return Stage2Module(init_from=str(stage1_checkpoint), language_model=language, prompt_tokens=2, prompt_hidden=32, max_new_tokens=6, results_dir=str(results_dir))


def run_test(stage1_checkpoint: Path, tiny_lm: Path, stage2_checkpoint: Path, out: Path, **data: Any) -> dict:
    """``trainer.test`` of the stage-2 test checkpoint with ``RegionDataModule(**data)``; the results.json it wrote."""
    from conftest import tiny_trainer

    from fineregion_pl import RegionDataModule

    module = tiny_stage2(stage1_checkpoint, tiny_lm, out)
    datamodule = RegionDataModule(**{"image_size": 64, "batch_size": 4, "num_workers": 0, **data})
    tiny_trainer(out, max_steps=1).test(module, datamodule=datamodule, ckpt_path=str(stage2_checkpoint), verbose=False)
    return json.loads((out / "results.json").read_text())
