"""``fineregion-pl ablations --suite hard``: the hard benchmark's rows, each changing one thing, over seeds.

Rows are ``configs/ablations/hard/rows/<row>.yaml``: a label, a ``stage1`` overlay and, for rows
that train stage 2, a ``stage2`` overlay. Stage-1-only rows (``s1_*``) are scored by the stage-1
head's class (``predict`` on every test-box variant); stage-2 rows by their generated captions
(``test`` on every variant). Before the rows, the recipe is chosen on the val split (:data:`TUNE`).
Every run lives in ``WORKDIR/<row>/seed<k>/`` with its configs, log and per-split outputs; finished
runs are not run again (resumable), and runs go side by side (``--jobs``, the easy suite's queue).
After the runs: the tables (paired bootstrap CIs against the full model), the breakdowns and the
plot (accuracy vs test-box IoU per row) go into ``docs/results.md`` below the predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import yaml

from fineregion_pl.commands.hard_report import STAGE1_SPLITS, TEST_SPLITS, write_report
from fineregion_pl.commands.run_configs import CONFIGS, recipe, write_run_config
from fineregion_pl.commands.run_configs import overlay_key as _key
from fineregion_pl.commands.run_queue import Run, run_all

HARD_DIR = CONFIGS / "ablations" / "hard"
STAGE1_ORDER = ["s1_global", "s1_hard", "s1_soft", "s1_dynamic", "s1_full", "s1_no_lmask", "s1_segmentation", "s1_roi_align_7x7"]
STAGE2_ORDER = ["full", "static_geometry", "consistency_0", "consistency_10x"]
VAL_SPLITS = ["val_gt", "val_det02"]
EVAL_MAX_REGIONS = 64  # the grounding variant adds two proposals per region
TUNE = {"row": "s1_full", "key": "model.init_args.dynamic.strength", "values": [0.5, 1.0, 2.0], "split": "val_det02"}
"""The recipe choice made on val (never test): stage 1 of ``row`` once per value (seed 0), region
accuracy on ``split``; every row whose masking is perturbed (dynamic, strength not 0) runs with the best."""


@dataclass(frozen=True)
class SuiteSize:
    """How big the suite runs: data, steps, seeds (``full``: the real suite; ``smoke``: toy size)."""

    train_images: int
    val_images: int
    test_images: int
    stage1_steps: int
    stage2_steps: int
    lm_steps: int
    stage1_seeds: tuple[int, ...]
    stage2_seeds: tuple[int, ...]
    batch_size: Optional[int] = None
    tune_values: tuple[float, ...] = tuple(TUNE["values"])

    def runs(self, rows: dict[str, dict]) -> dict[str, int]:
        """How many of each kind of run the rows make (tuning included)."""
        stage2 = [n for n, r in rows.items() if "stage2" in r]
        stage1_keys = {(_key(r["stage1"]), s) for n, r in rows.items() for s in (self.stage2_seeds if "stage2" in r else self.stage1_seeds)}
        return {
            "stage1_fit": len(stage1_keys) + len(self.tune_values),
            "stage1_eval_splits": sum(len(self.stage1_seeds) for n in rows if n not in stage2) * len(STAGE1_SPLITS) + len(self.tune_values),
            "stage2_fit": len(stage2) * len(self.stage2_seeds),
            "stage2_eval_splits": len(stage2) * len(self.stage2_seeds) * len(TEST_SPLITS),
        }


# provisional sizes (docs/results.md, "Run time": about 80 min estimated from the easy suite);
# check with `fineregion-pl ablations --suite hard --estimate true` in a quiet window, shrink steps first if > 2.5 h
FULL = SuiteSize(train_images=2000, val_images=100, test_images=150, stage1_steps=500, stage2_steps=250, lm_steps=300,
                 stage1_seeds=(0, 1, 2, 3, 4), stage2_seeds=(0, 1, 2))
SMOKE = SuiteSize(train_images=12, val_images=3, test_images=3, stage1_steps=2, stage2_steps=2, lm_steps=4,
                  stage1_seeds=(0,), stage2_seeds=(0,), batch_size=4, tune_values=(0.5, 1.0))


def in_one_process(commands: list[list[str]]) -> list[str]:
    """One ``fineregion-pl sequence`` command line running ``commands`` in a single process
    (each child process pays the imports and model building once, not once per split)."""
    import shlex

    return in_one_process_lines([shlex.join(c) for c in commands])


def in_one_process_lines(lines: list[str]) -> list[str]:
    return ["sequence", "--commands", json.dumps(lines)]


def load_hard_rows(names: Optional[list[str]] = None) -> dict[str, dict]:
    """The hard suite's row definitions in table order (all when ``names`` is empty)."""
    available = {p.stem: p for p in (HARD_DIR / "rows").glob("*.yaml")}
    ordered = [r for r in STAGE1_ORDER + STAGE2_ORDER if r in available] + sorted(set(available) - set(STAGE1_ORDER + STAGE2_ORDER))
    names = names or ordered
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown hard-suite row(s) {unknown}; rows: {ordered}")
    rows = {}
    for name in [n for n in ordered if n in names]:
        row = yaml.safe_load(available[name].read_text())
        missing = {"label", "stage1"} - set(row)
        if missing:
            raise ValueError(f"{available[name]}: missing key(s) {sorted(missing)}")
        rows[name] = row
    return rows


def prepare_hard_benchmark(root: Path, size: SuiteSize, seed: int = 0) -> tuple[Path, Path]:
    """The hard shards with every val/test-box variant (``root/data``) and a tiny LM pretrained on the hard texts."""
    from fineregion_pl.data.shards import MANIFEST
    from fineregion_pl.data.synthetic_hard import iter_hard_scenes, write_hard_synthetic
    from fineregion_pl.train.tiny_lm import build_tiny_lm, synthetic_pretraining_texts

    data = root / "data"
    splits = {"train": size.train_images, "val": size.val_images, **{s: size.val_images for s in VAL_SPLITS},
              "test": size.test_images, **{s: size.test_images for s in TEST_SPLITS}}
    if not all((data / s / MANIFEST).is_file() for s in splits):
        write_hard_synthetic(data, splits, seed=seed, shard_size=250)
    lm_dir = root / "tiny-lm"
    if not (lm_dir / "config.json").is_file():
        texts = synthetic_pretraining_texts(seed, min(size.train_images, 1000), scenes=iter_hard_scenes)
        build_tiny_lm(lm_dir, texts, steps=size.lm_steps, seed=seed)
    return data, lm_dir


def _perturbed(row: dict) -> bool:
    init = row["stage1"].get("model", {}).get("init_args", {})
    return init.get("masking", "dynamic") == "dynamic" and init.get("dynamic", {}).get("strength", 1.0) != 0.0


def _set(overlay: dict, dotted: str, value) -> dict:
    from fineregion_pl.commands.run_configs import deep_merge

    node: dict = {}
    top = node
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return deep_merge(overlay, top)


class Planner:
    """Writes every run's configs and lists the runs (stage 1 shared by rows with the same overlay)."""

    def __init__(self, root: Path, data: Path, lm_dir: Path, size: SuiteSize, java: bool):
        self.root, self.data, self.lm_dir, self.size = root, data, lm_dir, size
        self.overrides = {"data.num_workers": 0}
        if size.batch_size:
            self.overrides["data.batch_size"] = size.batch_size
        self.eval_args = ["--data.max_regions", str(EVAL_MAX_REGIONS)] + ([] if java else ["--data.score_without_java", "true"])
        self.stage1: dict[str, Run] = {}

    def stage1_run(self, overlay: dict, seed: int) -> tuple[str, Path, Path]:
        """The (shared) stage-1 fit of ``overlay`` with ``seed``: its run name, config and checkpoint."""
        folder = self.root / "stage1" / f"{_key(overlay)}-seed{seed}"
        name = f"stage1 {folder.name}"
        config = folder / "stage1.yaml"
        if name not in self.stage1:
            write_run_config(recipe("ablations/hard/stage1.yaml"), config, folder, self.data, overlay=overlay, overrides=self.overrides, steps=self.size.stage1_steps)
            self.stage1[name] = Run(name, [["fit", "--config", str(config), "--seed_everything", str(seed)]], folder / "finished", folder / "log.txt")
        return name, config, folder / "checkpoints" / "last.ckpt"

    def stage1_eval(self, label: str, overlay: dict, seed: int, out: Path, splits: list[str]) -> Run:
        """Stage-1 head predictions of ``overlay``'s stage 1 on ``splits`` (``out/<split>/predictions.jsonl``)."""
        after, config, ckpt = self.stage1_run(overlay, seed)
        commands = [["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--data.predict_split", split,
                     "--writer.output_dir", str(out / split), "--seed_everything", str(seed)] + self.eval_args for split in splits]
        return Run(label, [in_one_process(commands)], out / "evaluated", out / "log.txt", after=after)

    def stage2(self, name: str, row: dict, seed: int, stage1_overlay: dict, stage2_overlay: dict) -> Run:
        """Stage 2 of a row from its stage 1, then ``test`` on every test-box variant."""
        after, _, ckpt1 = self.stage1_run(stage1_overlay, seed)
        out = self.root / name / f"seed{seed}"
        paths = {"model.init_args.init_from": str(ckpt1), "model.init_args.language_model.name_or_path": str(self.lm_dir), "model.init_args.results_dir": str(out)}
        config = write_run_config(recipe("ablations/hard/stage2.yaml"), out / "stage2.yaml", out, self.data, overlay=stage2_overlay,
                                  overrides={**self.overrides, **paths}, steps=self.size.stage2_steps)
        seed_arg = ["--seed_everything", str(seed)]
        commands = [["fit", "--config", str(config)] + seed_arg]
        commands += [["test", "--config", str(config), "--ckpt_path", str(out / "checkpoints" / "last.ckpt"), "--data.test_split", split,
                      "--model.init_args.results_dir", str(out / split)] + seed_arg + self.eval_args for split in TEST_SPLITS]
        return Run(f"{name} seed{seed}", [in_one_process(commands)], out / "evaluated", out / "log.txt", after=after)

    def with_stage1(self, runs: list[Run]) -> list[Run]:
        needed = {run.after for run in runs if not run.done.is_file()}
        return [run for name, run in self.stage1.items() if name in needed] + runs


def tune(planner: Planner, rows: dict[str, dict], jobs: int) -> dict:
    """Choose :data:`TUNE`'s value on val (once; kept in ``WORKDIR/recipe.json``)."""
    from fineregion_pl.evaluation.hard_metrics import scored_regions

    chosen = planner.root / "recipe.json"
    if chosen.is_file():
        return json.loads(chosen.read_text())
    base = rows.get(TUNE["row"]) or load_hard_rows([TUNE["row"]])[TUNE["row"]]
    runs, outs = [], {}
    for value in planner.size.tune_values:
        overlay = _set(base["stage1"], TUNE["key"], value)
        out = planner.root / "tune" / f"{TUNE['key'].rsplit('.', 1)[-1]}-{value:g}"
        outs[value] = out
        runs.append(planner.stage1_eval(f"tune {out.name}", overlay, 0, out, [TUNE["split"]]))
    run_all(planner.with_stage1(runs), jobs=jobs)
    facts = planner.data / TUNE["split"] / "regions.jsonl"
    scores = {}
    for value, out in outs.items():
        regions = scored_regions(out / TUNE["split"] / "predictions.jsonl", facts).values()
        scores[value] = sum(r["region_acc"] for r in regions) / max(1, len(regions))
    best = max(scores, key=lambda v: (scores[v], -abs(v - 1.0)))
    recipe_choice = {"key": TUNE["key"], "value": best, "split": TUNE["split"], "val_region_acc": scores}
    chosen.write_text(json.dumps(recipe_choice, indent=1))
    return recipe_choice


def plan(planner: Planner, rows: dict[str, dict], choice: dict) -> list[Run]:
    """Every row's runs with the recipe chosen on val applied to the rows it concerns."""
    size = planner.size
    runs = []
    for name, row in rows.items():
        stage1 = _set(row["stage1"], choice["key"], choice["value"]) if _perturbed(row) else row["stage1"]
        if "stage2" in row:
            stage2 = _set(row["stage2"], choice["key"], choice["value"])
            runs += [planner.stage2(name, row, seed, stage1, stage2) for seed in size.stage2_seeds]
        else:
            runs += [planner.stage1_eval(f"{name} seed{seed}", stage1, seed, planner.root / name / f"seed{seed}", STAGE1_SPLITS) for seed in size.stage1_seeds]
    return planner.with_stage1(runs)


def hard_suite(
    rows: Optional[list[str]] = None,
    workdir: str = "runs/ablations-hard",
    out: Optional[str] = "docs/results.md",
    smoke: bool = False,
    jobs: int = 2,
    java: bool = True,
    size: Optional[SuiteSize] = None,
) -> dict:
    """Run the hard suite (or its toy-size smoke version) and write its tables and plot.

    Args:
        rows: row names (``configs/ablations/hard/rows/*.yaml``); default all.
        workdir: data, runs and per-run outputs (finished runs are reused).
        out: Markdown file whose hard-mode results section is (re)written (``None``: print only).
        smoke: toy sizes (:data:`SMOKE`): drives every step end to end in about a minute.
        jobs: runs side by side.
        java: score captions with Java (PTB tokenizer, METEOR).
        size: explicit sizes (default :data:`FULL`, or :data:`SMOKE` with ``smoke``).
    """
    started = time.time()
    size = size or (SMOKE if smoke else FULL)
    root = Path(workdir)
    definitions = load_hard_rows(rows)
    data, lm_dir = prepare_hard_benchmark(root, size)
    planner = Planner(root, data, lm_dir, size, java)
    choice = tune(planner, definitions, jobs)
    run_all(plan(planner, definitions, choice), jobs=jobs)
    return write_report(root, data, definitions, size, choice, out, time.time() - started, smoke)


def estimate_seconds(calibration: dict[str, tuple[float, float, float, float]], size: SuiteSize, rows: dict[str, dict], jobs: int = 2) -> dict:
    """The full suite's run time from calibration runs, extrapolated linearly.

    Args:
        calibration: per kind (``stage1_fit``, ``stage2_fit``: x = steps; ``stage1_eval``,
            ``stage2_eval``: x = test images) two measured points ``(x_a, seconds_a, x_b, seconds_b)``;
            each kind's cost is ``fixed + per_unit * x`` through the two points.
        size: the suite size to extrapolate to.
        jobs: runs side by side; assumed to give ``jobs`` times the throughput of one (each run
            is single-threaded, as the easy suite measured on this machine).
    """
    def line(kind: str, x: float) -> float:
        xa, sa, xb, sb = calibration[kind]
        per = (sb - sa) / (xb - xa)
        return max(0.0, sa + per * (x - xa))

    counts = size.runs(rows)
    parts = {
        "stage1_fit": counts["stage1_fit"] * line("stage1_fit", size.stage1_steps),
        "stage1_eval": counts["stage1_eval_splits"] * line("stage1_eval", size.test_images),
        "stage2_fit": counts["stage2_fit"] * line("stage2_fit", size.stage2_steps),
        "stage2_eval": counts["stage2_eval_splits"] * line("stage2_eval", size.test_images),
    }
    return {"runs": counts, "seconds_one_job": parts, "total_seconds": sum(parts.values()) / jobs, "jobs": jobs}


def calibrate(workdir: str = "runs/ablations-hard-calibration", steps: tuple[int, int] = (5, 25), images: tuple[int, int] = (4, 16)) -> dict:
    """Measure each kind of run at two sizes, one run at a time, each a child process with one
    thread (as in the suite), for :func:`estimate_seconds`: ``{kind: (x_a, s_a, x_b, s_b)}``."""
    root = Path(workdir)
    rows = load_hard_rows(["s1_full", "full"])
    result: dict[str, list[float]] = {}
    for which, (step_count, test_images) in enumerate(zip(steps, images)):
        size = replace(FULL, train_images=100, val_images=test_images, test_images=test_images, stage1_steps=step_count,
                       stage2_steps=step_count, lm_steps=20, stage1_seeds=(0,), stage2_seeds=(0,))
        sub = root / f"point{which}"
        data, lm_dir = prepare_hard_benchmark(sub, size)
        planner = Planner(sub, data, lm_dir, size, java=True)
        s1_eval = planner.stage1_eval("s1 eval", rows["s1_full"]["stage1"], 0, sub / "s1", ["test_gt"])
        s2 = planner.stage2("full", rows["full"], 0, rows["full"]["stage1"], rows["full"]["stage2"])
        lines = json.loads(s2.commands[0][2])
        s2_fit = Run("s2 fit", [in_one_process_lines(lines[:1])], sub / "s2_fitted", sub / "s2_fit.txt", after=s2.after)
        s2_test = Run("s2 test", [in_one_process_lines(lines[1:2])], sub / "s2_tested", sub / "s2_test.txt", after="s2 fit")
        fit1 = next(iter(planner.stage1.values()))
        seconds = {}
        for run in (fit1, s1_eval, s2_fit, s2_test):
            run.after = None  # run one at a time, in order
            done = run_all([run], jobs=2, threads=1)
            seconds[run.name] = done[0].seconds if done else float("nan")
        for kind, x, name in (("stage1_fit", step_count, fit1.name), ("stage1_eval", test_images, "s1 eval"),
                              ("stage2_fit", step_count, "s2 fit"), ("stage2_eval", test_images, "s2 test")):
            result.setdefault(kind, []).extend([x, seconds[name]])
    return {k: tuple(v) for k, v in result.items()}
