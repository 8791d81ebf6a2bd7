"""``fineregion-pl quickstart``: synthetic shards, tiny LM, stage 1, stage 2, test, results table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "quickstart"


def _stage_config(name: str, workdir: Path, steps: Optional[int], overrides: dict[str, Any], save_as: Optional[str] = None) -> Path:
    """Copy ``configs/quickstart/<name>.yaml`` into ``workdir/configs`` with the workdir's paths."""
    source = CONFIG_DIR / f"{name}.yaml"
    if not source.is_file():
        raise FileNotFoundError(f"quickstart config not found: {source} (run the quickstart from a source checkout installed with `pip install -e .`)")
    config = yaml.safe_load(source.read_text())
    stage_dir = workdir / name
    config["trainer"]["default_root_dir"] = str(stage_dir)
    if steps is not None:
        config["trainer"]["max_steps"] = steps
        config["trainer"]["val_check_interval"] = max(1, steps // 2)
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(stage_dir / "checkpoints")
            if steps is not None:
                callback["init_args"]["every_n_train_steps"] = max(1, steps // 2)
    config["data"]["data_dirs"] = [str(workdir / "data")]
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    out = workdir / "configs" / f"{save_as or name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


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
    """
    from .cli import cli_main
    from .data.shards import MANIFEST
    from .data.synthetic import write_synthetic
    from .evaluation.report import results_table, write_results
    from .tiny_lm import build_tiny_lm, synthetic_pretraining_texts

    started = time.time()
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not all((data / s / MANIFEST).is_file() for s in ("train", "val", "test")):
        write_synthetic(data, {"train": train_images, "val": val_images, "test": test_images}, seed=seed, shard_size=250)
    lm_dir = root / "tiny-lm"
    if not (lm_dir / "config.json").is_file():
        build_tiny_lm(lm_dir, synthetic_pretraining_texts(seed, min(train_images, 1000)), steps=lm_steps, seed=seed)

    seed_arg = ["--seed_everything", str(seed)]
    stage1 = _stage_config("stage1", root, stage1_steps, {})
    cli_main(["fit", "--config", str(stage1)] + seed_arg)
    stage1_ckpt = root / "stage1" / "checkpoints" / "last.ckpt"

    overrides = {
        "model.init_args.init_from": str(stage1_ckpt),
        "model.init_args.language_model.name_or_path": str(lm_dir),
        "model.init_args.results_dir": str(root),
    }
    stage2 = _stage_config("stage2", root, stage2_steps, overrides)
    cli_main(["fit", "--config", str(stage2)] + seed_arg)
    stage2_ckpt = root / "stage2" / "checkpoints" / "last.ckpt"
    cli_main(["test", "--config", str(stage2), "--ckpt_path", str(stage2_ckpt)] + seed_arg)
    results = json.loads((root / "results.json").read_text())

    if control:
        control_dir = root / "no_region_control"
        overrides.update({"model.init_args.ignore_regions": True, "model.init_args.results_dir": str(control_dir)})
        control = _stage_config("stage2", root, stage2_steps, overrides, save_as="stage2_no_region_control")
        cli_main(["test", "--config", str(control), "--ckpt_path", str(stage2_ckpt)] + seed_arg)
        control_results = json.loads((control_dir / "results.json").read_text())
        results["no_region_control"] = {
            "caption_CIDEr": control_results["caption"]["CIDEr"],
            "caption_exact_match": control_results["caption"]["exact_match"],
            "classification_accuracy": control_results["classification"]["accuracy"],
        }
    results["run"] = {"workdir": str(root), "stage1_checkpoint": str(stage1_ckpt), "stage2_checkpoint": str(stage2_ckpt), "seconds": round(time.time() - started, 1)}
    write_results(results, root, title="Quickstart results (synthetic benchmark, test split)")
    print(f"\nQuickstart results (synthetic test split, {results['caption']['regions']} regions)\n\n{results_table(results)}\n")
    print(f"results: {root / 'results.json'}  ({results['run']['seconds']:.0f} s)")
    return results
