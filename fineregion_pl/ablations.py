"""``fineregion-pl ablations``: the paper's Table 1 (methods) and Table 2 (ablations) on the synthetic benchmark.

Each row is a file ``configs/ablations/rows/<row>.yaml`` with a label, the tables it belongs to,
and overlays of the base recipes ``configs/ablations/stage1.yaml`` / ``stage2.yaml``. For every
row and seed: stage 1 (shared by rows whose stage-1 overlay is the same), stage 2 from it, test.
Every run keeps its merged configs and ``results.json`` under ``WORKDIR/<row>/seed<k>/``; a run
whose ``results.json`` exists is not run again, so an interrupted comparison continues.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from .run_configs import CONFIGS, recipe, write_run_config

ROWS_DIR = CONFIGS / "ablations" / "rows"
ROW_ORDER = ["global", "roi_align", "full", "no_masking", "no_dynamic", "static_prompts"]
COLUMNS = [
    ("classification", "accuracy", "Region cls. acc."),
    ("classification", "macro_f1", "Region cls. F1"),
    ("caption", "CIDEr", "CIDEr"),
    ("caption", "METEOR", "METEOR"),
    ("grounding", "acc@0.5", "Grounding acc@0.5"),
    ("grounding", "mIoU", "Grounding mIoU"),
    ("spatial", "accuracy", "Spatial acc."),
]


def load_rows(names: Optional[list[str]] = None) -> dict[str, dict]:
    """The row definitions, in table order (all rows when ``names`` is empty)."""
    available = {p.stem: p for p in ROWS_DIR.glob("*.yaml")}
    ordered = [r for r in ROW_ORDER if r in available] + sorted(set(available) - set(ROW_ORDER))
    names = names or ordered
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown ablation row(s) {unknown}; rows: {ordered}")
    rows = {}
    for name in names:
        row = yaml.safe_load(available[name].read_text())
        missing = {"label", "tables", "stage1", "stage2"} - set(row)
        if missing:
            raise ValueError(f"{available[name]}: missing key(s) {sorted(missing)}")
        rows[name] = row
    return rows


def _key(overlay: dict) -> str:
    return hashlib.sha1(json.dumps(overlay, sort_keys=True).encode()).hexdigest()[:10]


def run_row(name: str, row: dict, seed: int, root: Path, data: Path, lm_dir: Path, stage1_steps: Optional[int], stage2_steps: Optional[int]) -> dict:
    """Train and test one row with one seed (stage 1 reused when another row already made it)."""
    from .cli import cli_main

    run_dir = root / name / f"seed{seed}"
    results_path = run_dir / "results.json"
    if results_path.is_file():
        return json.loads(results_path.read_text())
    seed_arg = ["--seed_everything", str(seed)]
    stage1_dir = root / "stage1" / f"{_key(row['stage1'])}-seed{seed}"
    stage1_ckpt = stage1_dir / "checkpoints" / "last.ckpt"
    if not stage1_ckpt.is_file():
        config = write_run_config(recipe("ablations/stage1.yaml"), stage1_dir / "stage1.yaml", stage1_dir, data, overlay=row["stage1"], steps=stage1_steps)
        cli_main(["fit", "--config", str(config)] + seed_arg)
    overrides = {
        "model.init_args.init_from": str(stage1_ckpt),
        "model.init_args.language_model.name_or_path": str(lm_dir),
        "model.init_args.results_dir": str(run_dir),
    }
    config = write_run_config(recipe("ablations/stage2.yaml"), run_dir / "stage2.yaml", run_dir, data, overlay=row["stage2"], overrides=overrides, steps=stage2_steps)
    cli_main(["fit", "--config", str(config)] + seed_arg)
    cli_main(["test", "--config", str(config), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")] + seed_arg)
    return json.loads(results_path.read_text())


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per row and column: mean, standard deviation (0 for one seed) and the number of seeds."""
    table = {}
    for name, runs in results.items():
        table[name] = {}
        for section, metric, _ in COLUMNS:
            values = [r[section][metric] for r in runs if metric in r.get(section, {})]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table[name][f"{section}/{metric}"] = (statistics.fmean(values), std, len(values))
    return table


def markdown_tables(rows: dict[str, dict], summary: dict, command: str, seconds: float) -> str:
    """Table 1 (methods) and Table 2 (ablations) as Markdown, mean ± std over seeds."""
    head = "| Model | " + " | ".join(label for *_, label in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    parts = [
        "# Comparison on the synthetic benchmark",
        "",
        "Test split of the built-in synthetic benchmark; mean ± standard deviation over seeds. Region "
        "classification is the stage-1 head's; captions are scored by pycocoevalcap; grounding ranks an "
        "image's regions by the likelihood of the referring expression; spatial questions are answered "
        "by the language model.",
        "",
        f"Made by: `{command}` ({seconds / 60:.0f} min on this machine).",
    ]
    for number, title in ((1, "Table 1. Methods"), (2, "Table 2. Ablations")):
        parts += ["", f"## {title}", "", head, rule]
        for name, row in rows.items():
            if number not in row["tables"] or name not in summary:
                continue
            cells = []
            for section, metric, _ in COLUMNS:
                value = summary[name].get(f"{section}/{metric}")
                cells.append("-" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}")
            seeds = max((v[2] for v in summary[name].values()), default=0)
            parts.append(f"| {row['label']} (n={seeds}) | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def ablations(
    rows: Optional[list[str]] = None,
    seeds: list[int] = [0, 1, 2],
    workdir: str = "runs/ablations",
    out: Optional[str] = "docs/results.md",
    train_images: int = 2000,
    val_images: int = 100,
    test_images: int = 200,
    stage1_steps: Optional[int] = None,
    stage2_steps: Optional[int] = None,
    lm_steps: int = 300,
) -> dict:
    """Run the comparison rows over seeds and write Table 1 and Table 2 (mean ± std).

    Args:
        rows: row names (``configs/ablations/rows/*.yaml``); default all.
        seeds: training seeds (the benchmark and the tiny LM are the same for every seed).
        workdir: folder for data, runs and per-run results (finished runs are reused).
        out: Markdown file for the tables (``null`` to only print them).
        train_images, val_images, test_images: synthetic benchmark size (when it is made).
        stage1_steps, stage2_steps: override the base recipes' ``max_steps``.
        lm_steps: pretraining steps of the tiny LM.
    """
    from .quickstart import prepare_benchmark

    started = time.time()
    root = Path(workdir)
    definitions = load_rows(rows)
    data, lm_dir = prepare_benchmark(root, train_images, val_images, test_images, lm_steps, seed=0)
    results: dict[str, list[dict]] = {name: [] for name in definitions}
    for seed in seeds:
        for name, row in definitions.items():
            results[name].append(run_row(name, row, seed, root, data, lm_dir, stage1_steps, stage2_steps))
    summary = summarise(results)
    command = "fineregion-pl ablations " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["ablations"] else "fineregion-pl ablations"
    text = markdown_tables(definitions, summary, command.strip(), time.time() - started)
    print("\n" + text)
    (root / "summary.json").write_text(json.dumps({n: {k: list(v) for k, v in s.items()} for n, s in summary.items()}, indent=1))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"tables written to {out}")
    return summary
