"""``fineregion-pl ablations``: the paper's Table 1 (methods) and Table 2 (ablations) on the synthetic benchmark.

Each row is a file ``configs/ablations/rows/<row>.yaml`` with a label, the tables it belongs to,
and overlays of the base recipes ``configs/ablations/stage1.yaml`` / ``stage2.yaml``. For every
row and seed: stage 1 (shared by rows whose stage-1 overlay is the same), stage 2 from it, test.
Every run keeps its merged configs, its log and ``results.json`` under ``WORKDIR/<row>/seed<k>/``;
a finished run is not run again, so an interrupted comparison continues. Runs go side by side
(``--jobs``, :mod:`fineregion_pl.commands.run_queue`).
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from fineregion_pl.commands.run_configs import CONFIGS, recipe, write_run_config
from fineregion_pl.commands.run_configs import overlay_key as _key
from fineregion_pl.commands.run_queue import Run, run_all
from fineregion_pl.model.errors import FineRegionError

ROWS_DIR = CONFIGS / "ablations" / "rows"
ROW_ORDER = ["global", "roi_align", "full", "no_masking", "no_dynamic", "static_prompts"]
COLUMNS = [
    ("classification", "accuracy", "Region cls. acc."),
    ("classification", "macro_f1", "Region cls. F1"),
    ("caption", "CIDEr", "CIDEr"),
    ("caption", "METEOR", "METEOR"),
    ("gt-ranking", "acc@0.5", "gt-ranking acc@0.5"),
    ("gt-ranking", "mIoU", "gt-ranking mIoU"),
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


def row_dir(root: Path, name: str, seed: int) -> Path:
    """Where a row's run with one seed keeps its configs, log, checkpoints and ``results.json``."""
    return root / name / f"seed{seed}"


def plan_runs(
    rows: dict[str, dict], seeds: list[int], root: Path, data: Path, lm_dir: Path,
    stage1_steps: Optional[int], stage2_steps: Optional[int], overrides: Optional[dict] = None,
) -> list[Run]:
    """Write the configs of every run and list the runs, each stage 1 before the rows that use it.

    A stage 1 is shared by the rows of one seed whose ``stage1`` overlays are equal; a row's run
    is stage 2 from it, then ``test`` (which writes ``WORKDIR/<row>/seed<k>/results.json``).
    """
    overrides = overrides or {}
    stage1_runs: dict[str, Run] = {}
    stage2_runs: list[Run] = []
    for seed in seeds:
        seed_arg = ["--seed_everything", str(seed)]
        for name, row in rows.items():
            stage1_dir = root / "stage1" / f"{_key(row['stage1'])}-seed{seed}"
            stage1_ckpt = stage1_dir / "checkpoints" / "last.ckpt"
            stage1_name = f"stage1 {stage1_dir.name}"
            if stage1_name not in stage1_runs:
                config = write_run_config(recipe("ablations/stage1.yaml"), stage1_dir / "stage1.yaml", stage1_dir, data, overlay=row["stage1"], overrides=overrides, steps=stage1_steps)
                stage1_runs[stage1_name] = Run(stage1_name, [["fit", "--config", str(config)] + seed_arg], stage1_dir / "finished", stage1_dir / "log.txt")
            run_dir = row_dir(root, name, seed)
            paths = {
                "model.init_args.init_from": str(stage1_ckpt),
                "model.init_args.language_model.name_or_path": str(lm_dir),
                "model.init_args.results_dir": str(run_dir),
            }
            config = write_run_config(recipe("ablations/stage2.yaml"), run_dir / "stage2.yaml", run_dir, data, overlay=row["stage2"], overrides={**overrides, **paths}, steps=stage2_steps)
            commands = [["fit", "--config", str(config)] + seed_arg, ["test", "--config", str(config), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")] + seed_arg]
            stage2_runs.append(Run(f"{name} seed{seed}", commands, run_dir / "results.json", run_dir / "log.txt", after=stage1_name, mark_done=False))
    needed = {run.after for run in stage2_runs if not run.done.is_file()}  # rows copied in by SLURM tasks need no stage 1
    return [run for name, run in stage1_runs.items() if name in needed] + stage2_runs


def _section(results: dict, section: str) -> dict:
    """A section of a results.json; runs finished before gt-ranking had its name call it "grounding"."""
    return results.get(section) or (results.get("grounding", {}) if section == "gt-ranking" else {})


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per row and column: mean, standard deviation (0 for one seed) and the number of seeds."""
    table = {}
    for name, runs in results.items():
        table[name] = {}
        for section, metric, _ in COLUMNS:
            values = [_section(r, section)[metric] for r in runs if metric in _section(r, section)]
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
        "classification is the stage-1 head's; captions are scored by pycocoevalcap; gt-ranking ranks an "
        "image's annotated regions by the likelihood of the referring expression (not REC); spatial questions are answered "
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
    jobs: int = 2,
    suite: str = "easy",
    smoke: bool = False,
    estimate: bool = False,
) -> dict:
    """Run the comparison rows over seeds and write Table 1 and Table 2 (mean ± std).

    ``--suite hard`` runs the hard benchmark's suite instead (:mod:`fineregion_pl.commands.hard_suite`:
    its own rows, seeds and sizes; ``rows``, ``workdir``, ``out`` and ``jobs`` apply, the size
    arguments do not); ``--smoke true`` runs it at toy size end to end, ``--estimate true``
    measures calibration runs and prints the full suite's extrapolated run time.

    Args:
        rows: row names (``configs/ablations/rows/*.yaml``); default all.
        seeds: training seeds (the benchmark and the tiny LM are the same for every seed).
        workdir: folder for data, runs and per-run results (finished runs are reused).
        out: Markdown file for the tables (``null`` to only print them).
        train_images, val_images, test_images: synthetic benchmark size (when it is made).
        stage1_steps, stage2_steps: override the base recipes' ``max_steps``.
        lm_steps: pretraining steps of the tiny LM.
        jobs: runs side by side, each in its own process with ``cores // jobs`` threads
            (1: one after the other, in this process).
        suite: ``easy`` (Table 1 and 2 on the quickstart's benchmark) or ``hard``.
        smoke: with ``--suite hard``: toy sizes (about a minute), results in ``WORKDIR/results.md``.
        estimate: with ``--suite hard``: calibrate and print the full suite's run time, run nothing else.
    """
    from fineregion_pl.commands.quickstart import prepare_benchmark

    if suite not in ("easy", "hard"):
        raise FineRegionError(f"--suite must be 'easy' or 'hard', got {suite!r}")
    if suite == "hard":
        return _hard(rows, workdir, out, jobs, smoke, estimate)

    started = time.time()
    root = Path(workdir)
    definitions = load_rows(rows)
    data, lm_dir = prepare_benchmark(root, train_images, val_images, test_images, lm_steps, seed=0)
    # side by side, each run gets its share of the cores and loads data in its own process
    overrides = {"data.num_workers": 0} if jobs > 1 else {}
    run_all(plan_runs(definitions, seeds, root, data, lm_dir, stage1_steps, stage2_steps, overrides), jobs=jobs)
    results = {name: [json.loads((row_dir(root, name, seed) / "results.json").read_text()) for seed in seeds] for name in definitions}
    summary = summarise(results)
    command = "fineregion-pl ablations " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["ablations"] else "fineregion-pl ablations"
    text = markdown_tables(definitions, summary, command.strip(), time.time() - started)
    print("\n" + text)
    (root / "summary.json").write_text(json.dumps({n: {k: list(v) for k, v in s.items()} for n, s in summary.items()}, indent=1))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        old = Path(out).read_text() if Path(out).is_file() else ""
        hard = old[old.index(HARD_SECTION):] if HARD_SECTION in old else ""  # the hard suite's predictions and results stay
        Path(out).write_text(text + ("\n" + hard if hard else ""))
        print(f"tables written to {out}")
    return summary


HARD_SECTION = "# Hard mode"


def _hard(rows: Optional[list[str]], workdir: str, out: Optional[str], jobs: int, smoke: bool, estimate: bool) -> dict:
    from fineregion_pl.commands.hard_suite import FULL, calibrate, estimate_seconds, hard_suite, load_hard_rows

    workdir = "runs/ablations-hard" if workdir == "runs/ablations" else workdir
    if estimate:
        calibration = calibrate(str(Path(workdir) / "calibration"))
        result = {"calibration": calibration, **estimate_seconds(calibration, FULL, load_hard_rows(rows), jobs)}
        print(json.dumps(result, indent=1))
        print(f"estimated run time of the full hard suite: {result['total_seconds'] / 3600:.2f} h with {jobs} runs side by side")
        (Path(workdir) / "estimate.json").write_text(json.dumps(result, indent=1))
        return result
    return hard_suite(rows, workdir, out, smoke=smoke, jobs=jobs, java=not smoke)
