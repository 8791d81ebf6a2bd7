"""Writing the exact config a pipeline step runs: a recipe, an overlay and paths, merged into one YAML.

The quickstart and the comparison tables run LightningCLI on configs written by these helpers,
so every run leaves behind the complete config it ran (``WORKDIR/configs/*.yaml``), which a user
can re-run by hand with ``fineregion-pl fit --config``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml


def recipes_root() -> Path:
    """The folder of the YAML recipes: the ``configs/`` beside the package in a source checkout
    (so a checkout put first on ``PYTHONPATH``, e.g. a git worktree, runs its own recipes even when
    another checkout is pip-installed in editable mode), else the installed ``fineregion_pl.recipes``."""
    from importlib.resources import files

    beside = Path(__file__).resolve().parents[2] / "configs"
    if (beside / "quickstart" / "stage1.yaml").is_file():
        return beside
    try:
        return Path(str(files("fineregion_pl.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


CONFIGS = recipes_root()


def recipe(relative: str) -> Path:
    """Path of a recipe (``quickstart/stage1.yaml``), with a clear error if absent."""
    path = CONFIGS / relative
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path} (the installed package lacks its recipes: reinstall fineregion-pl)")
    return path


def overlay_key(overlay: dict) -> str:
    """A short stable name for a config overlay (runs with equal overlays share a folder)."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(overlay, sort_keys=True).encode()).hexdigest()[:10]


def deep_merge(base: dict, overlay: dict) -> dict:
    """``base`` updated by ``overlay`` recursively (dicts merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_run_config(
    source: Path,
    out: Path,
    run_dir: Path,
    data_dir: Path,
    overlay: Optional[dict] = None,
    overrides: Optional[dict[str, Any]] = None,
    steps: Optional[int] = None,
) -> Path:
    """Merge ``overlay`` into the ``source`` recipe, point it at ``run_dir`` and ``data_dir``, write ``out``.

    Args:
        source: the recipe YAML.
        out: where to write the merged config.
        run_dir: the run's folder (``trainer.default_root_dir``; checkpoints in ``run_dir/checkpoints``).
        data_dir: the shard set the run reads.
        overlay: nested config merged on top of the recipe.
        overrides: dotted keys set last (``{"model.init_args.init_from": "..."}``).
        steps: ``trainer.max_steps`` (validation and checkpoints every ``steps // 2``).
    """
    config = deep_merge(yaml.safe_load(Path(source).read_text()), overlay or {})
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir)
    if steps is not None:
        trainer["max_steps"] = steps
        trainer["val_check_interval"] = max(1, steps // 2)
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(Path(run_dir) / "checkpoints")
            if steps is not None and "every_n_train_steps" in callback["init_args"]:
                callback["init_args"]["every_n_train_steps"] = max(1, steps // 2)
    config.setdefault("data", {})["data_dirs"] = [str(data_dir)]
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out
