"""``fineregion-pl quickstart``: synthetic shards, tiny LM, stage 1, stage 2, test, results table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional


def prepare_benchmark(root: Path, train_images: int, val_images: int, test_images: int, lm_steps: int, seed: int) -> tuple[Path, Path]:
    """The synthetic shards (``root/data``) and the tiny pretrained LM (``root/tiny-lm``), made if missing."""
    from fineregion_pl.data.shards import MANIFEST
    from fineregion_pl.data.synthetic import write_synthetic
    from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts

    data = root / "data"
    if not all((data / s / MANIFEST).is_file() for s in ("train", "val", "test")):
        write_synthetic(data, {"train": train_images, "val": val_images, "test": test_images}, seed=seed, shard_size=250)
    lm_dir = root / "tiny-lm"
    if not (lm_dir / "config.json").is_file():
        build_tiny_lm(lm_dir, synthetic_pretraining_texts(seed, min(train_images, 1000)), steps=lm_steps, seed=seed)
    return data, lm_dir


def quickstart(
    workdir: str = "runs/quickstart",
    train_images: int = 2000,
    val_images: int = 200,
    test_images: int = 300,
    stage1_steps: Optional[int] = None,
    stage2_steps: Optional[int] = None,
    lm_steps: int = 300,
    seed: int = 0,
    control: bool = True,
    pictures: int = 8,
) -> dict:
    """Run the whole pipeline on the built-in synthetic benchmark, on the CPU.

    Makes the synthetic shards and a tiny pretrained LM if they are missing, trains stage 1,
    trains stage 2 from stage 1's checkpoint, tests it, prints a results table and writes
    ``WORKDIR/results.json``. The configs it ran are saved in ``WORKDIR/configs``.

    Args:
        workdir: folder for data, models, checkpoints and results.
        train_images: synthetic training images (when the shards are made).
        val_images: synthetic validation images.
        test_images: synthetic test images.
        stage1_steps: stage-1 optimizer steps (default: the config's).
        stage2_steps: stage-2 optimizer steps (default: the config's).
        lm_steps: pretraining steps of the tiny language model.
        seed: seed of the benchmark, the tiny LM and both stages.
        control: also test the same model with every box replaced by the whole image
            (no region information) and report it beside the real result.
        pictures: draw this many test images with every region's box and generated caption
            (``WORKDIR/pictures/images/*.png``; 0: none).
    """
    from fineregion_pl.commands.run_configs import recipe, write_run_config
    from fineregion_pl.evaluation.report import results_table, write_results
    from fineregion_pl.train.cli import run_lightning

    started = time.time()
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    data, lm_dir = prepare_benchmark(root, train_images, val_images, test_images, lm_steps, seed)

    seed_arg = ["--seed_everything", str(seed)]
    configs = root / "configs"
    stage1 = write_run_config(recipe("quickstart/stage1.yaml"), configs / "stage1.yaml", root / "stage1", data, steps=stage1_steps)
    run_lightning(["fit", "--config", str(stage1)] + seed_arg)
    stage1_ckpt = root / "stage1" / "checkpoints" / "last.ckpt"

    overrides = {
        "model.init_args.init_from": str(stage1_ckpt),
        "model.init_args.language_model.name_or_path": str(lm_dir),
        "model.init_args.results_dir": str(root),
    }
    stage2 = write_run_config(recipe("quickstart/stage2.yaml"), configs / "stage2.yaml", root / "stage2", data, overrides=overrides, steps=stage2_steps)
    run_lightning(["fit", "--config", str(stage2)] + seed_arg)
    stage2_ckpt = root / "stage2" / "checkpoints" / "last.ckpt"
    run_lightning(["test", "--config", str(stage2), "--ckpt_path", str(stage2_ckpt)] + seed_arg)
    results = json.loads((root / "results.json").read_text())
    if pictures > 0:
        run_lightning(["predict", "--config", str(stage2), "--ckpt_path", str(stage2_ckpt), "--trainer.limit_predict_batches", "1",
                  "--data.eval_batch_size", str(pictures), "--writer.output_dir", str(root / "pictures"), "--writer.draw", "true"] + seed_arg)

    if control:
        control_dir = root / "no_region_control"
        overrides.update({"model.init_args.ignore_regions": True, "model.init_args.results_dir": str(control_dir)})
        control = write_run_config(recipe("quickstart/stage2.yaml"), configs / "stage2_no_region_control.yaml", root / "stage2", data, overrides=overrides, steps=stage2_steps)
        run_lightning(["test", "--config", str(control), "--ckpt_path", str(stage2_ckpt)] + seed_arg)
        control_results = json.loads((control_dir / "results.json").read_text())
        results["no_region_control"] = {
            "caption_CIDEr": control_results["caption"]["CIDEr"],
            "caption_exact_match": control_results["caption"]["exact_match"],
            "classification_accuracy": control_results["classification"]["accuracy"],
            "gt-ranking_acc@0.5": control_results["gt-ranking"]["acc@0.5"],
        }
    results["run"] = {"workdir": str(root), "stage1_checkpoint": str(stage1_ckpt), "stage2_checkpoint": str(stage2_ckpt), "seconds": round(time.time() - started, 1)}
    write_results(results, root, title="Quickstart results (synthetic benchmark, test split)")
    print(f"\nQuickstart results (synthetic test split, {results['caption']['regions']} regions)\n\n{results_table(results)}\n")
    print(f"results: {root / 'results.json'}  ({results['run']['seconds']:.0f} s)")
    if pictures > 0:
        print(f"pictures of test images with their regions and captions: {root / 'pictures' / 'images'}")
    return results
