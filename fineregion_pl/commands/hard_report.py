"""The hard suite's report: tables with paired bootstrap CIs, breakdowns, the predictions' verdicts, the plot.

Written into ``docs/results.md`` between :data:`BEGIN` and :data:`END` (the predictions above them
are never touched); the plot goes to ``images/hard_accuracy_vs_iou.png`` beside that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fineregion_pl.evaluation.hard_metrics import (
    BREAKDOWNS,
    bin_of,
    breakdown,
    paired_bootstrap,
    scored_expressions,
    scored_regions,
    scored_vision_questions,
)

BEGIN = "<!-- hard-suite results: written by `fineregion-pl ablations --suite hard` -->"
END = "<!-- end of hard-suite results -->"
STAGE1_REFERENCE, STAGE2_REFERENCE = "s1_full", "full"
PLOT = "images/hard_accuracy_vs_iou.png"
TEST_SPLITS = ["test_gt", "test_det01", "test_det02", "test_loose", "test_ground"]
STAGE1_SPLITS = TEST_SPLITS[:4]  # the grounding variant's extra boxes only matter to grounding (stage 2)
EXPRESSIONS, VISION = ":expressions", ":vision"
"""Suffixes of the table's per-expression (gt-ranking hit) and per-question (one-anchor answer) entries of a split."""


def collect(root: Path, data: Path, rows: dict[str, dict], size) -> dict[str, dict[str, dict[int, dict]]]:
    """``{row: {split: {seed: {region_key: region}}}}`` of every finished run; stage-2 runs also
    ``split + EXPRESSIONS`` (per grounded expression) and ``split + VISION`` (per one-anchor question)."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for name, row in rows.items():
        stage2 = "stage2" in row
        seeds, splits = (size.stage2_seeds, TEST_SPLITS) if stage2 else (size.stage1_seeds, STAGE1_SPLITS)
        for split in splits:
            for seed in seeds:
                folder = root / name / f"seed{seed}" / split
                if (folder / "predictions.jsonl").is_file():
                    out.setdefault(name, {}).setdefault(split, {})[seed] = scored_regions(folder / "predictions.jsonl", data / split / "regions.jsonl")
                if (folder / "expressions.jsonl").is_file():
                    out[name].setdefault(split + EXPRESSIONS, {})[seed] = scored_expressions(folder / "expressions.jsonl", data / split / "regions.jsonl")
                if (folder / "vision_questions.jsonl").is_file():
                    out[name].setdefault(split + VISION, {})[seed] = scored_vision_questions(folder / "vision_questions.jsonl")
    return out


def _scores(runs: dict[int, dict], score: str, keep=lambda r: True) -> dict[int, dict]:
    return {seed: {k: r[score] for k, r in regions.items() if score in r and keep(r)} for seed, regions in runs.items()}


def _mean(runs: dict[int, dict]) -> float:
    values = [v for regions in runs.values() for v in regions.values()]
    return sum(values) / max(1, len(values))


def difference(table, row: str, reference: str, split: str, score: str, keep=lambda r: True) -> Optional[tuple[float, float, float]]:
    """Paired bootstrap ``(difference, low, high)`` of ``row - reference`` (``None`` when either is missing)."""
    if row not in table or reference not in table or split not in table[row] or split not in table[reference]:
        return None
    a, b = _scores(table[row][split], score, keep), _scores(table[reference][split], score, keep)
    if not any(a.values()) or not set(a) & set(b):
        return None
    return paired_bootstrap(a, b, resamples=1000)


def _cell(table, row, reference, split, score, keep=lambda r: True) -> str:
    if row not in table or split not in table[row]:
        return "-"
    mean = _mean(_scores(table[row][split], score, keep))
    if row == reference:
        return f"**{mean:.3f}**"
    diff = difference(table, row, reference, split, score, keep)
    return f"{mean:.3f}" if diff is None else f"{mean:.3f} ({100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}])"


def _table(table, rows, names, reference, columns) -> list[str]:
    head = "| row | " + " | ".join(label for label, *_ in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for name in names:
        seeds = max((len(v) for v in table.get(name, {}).values()), default=0)
        lines.append(f"| {rows[name]['label']} (`{name}`, n={seeds}) | " + " | ".join(_cell(table, name, reference, *c[1:]) for c in columns) + " |")
    return lines


def _results_json(root: Path, name: str, seeds, split: str, section: str, metric: str) -> Optional[float]:
    values = []
    for seed in seeds:
        path = root / name / f"seed{seed}" / split / "results.json"
        if path.is_file():
            value = json.loads(path.read_text()).get(section, {}).get(metric)
            if value is not None:
                values.append(value)
    return sum(values) / len(values) if values else None


FOREIGN = lambda r: r.get("foreign_share", 0) > 0.3  # noqa: E731
INTERSECTING = lambda r: bool(r.get("intersects"))  # noqa: E731
RELATIONAL = lambda r: r.get("expression_kind") == "relational"  # noqa: E731
FLOOR_EXACT = 0.05
"""Caption exactness under which P3's "lowers exactness" cannot be told (both rows at the floor)."""
CHANCE_MARGIN = 0.03
"""P4 is not separable when both rows answer the vision questions within this of always naming the most frequent answer."""


def majority_share(table, name: str) -> Optional[float]:
    """The share of the one-anchor questions (test_gt, first seed) whose answer is the most frequent
    answer: what always naming that shape would score (``None`` without answers)."""
    from collections import Counter

    runs = table.get(name, {}).get("test_gt" + VISION)
    if not runs:
        return None
    answers = Counter(q["answer"] for q in runs[min(runs)].values())
    return answers.most_common(1)[0][1] / sum(answers.values())


def verdicts(table) -> list[str]:
    """P1-P4 against their thresholds, with the numbers and CIs."""
    def fmt(d):
        return "missing" if d is None else f"{100 * d[0]:+.1f} points [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"

    hard_soft = difference(table, "s1_hard", "s1_soft", "test_gt", "region_acc")
    dyn_soft_gt = difference(table, "s1_dynamic", "s1_soft", "test_gt", "region_acc")
    dyn_soft = difference(table, "s1_dynamic", "s1_soft", "test_det02", "region_acc")
    p1 = None not in (hard_soft, dyn_soft_gt, dyn_soft) and abs(hard_soft[0]) <= 0.01 and abs(dyn_soft_gt[0]) <= 0.01 and dyn_soft[0] >= 0.03 and dyn_soft[1] > 0
    seg = difference(table, "s1_segmentation", "s1_full", "test_gt", "region_acc", FOREIGN)
    lmask = difference(table, "s1_full", "s1_no_lmask", "test_gt", "region_acc", FOREIGN)
    p2 = None not in (seg, lmask) and seg[0] >= 0.05 and lmask[0] >= 0.02
    p3d = difference(table, "consistency_10x", "consistency_0", "test_gt", "exact", INTERSECTING)
    p3 = p3d is not None and p3d[2] < 0
    relational = difference(table, "full", "static_geometry", "test_gt" + EXPRESSIONS, "ranking_acc", RELATIONAL)
    vision = difference(table, "full", "static_geometry", "test_gt" + VISION, "vision_acc")
    p4 = None not in (relational, vision) and relational[0] >= 0.05 and vision[0] >= 0.05

    def word(ok, *parts, floor=None):
        if any(p is None for p in parts):
            return "not measured (rows missing)"
        return f"**not separable here** ({floor})" if floor else ("**held**" if ok else "**refuted**")

    # a difference between two rows that both sit at the score's floor says nothing about the claim
    exact = {r: _mean(_scores(table[r]["test_gt"], "exact", INTERSECTING)) for r in ("consistency_10x", "consistency_0") if "test_gt" in table.get(r, {})}
    p3_floor = f"exactness on intersecting regions {', '.join(f'{v:.3f}' for v in exact.values())}: at the floor, it cannot go lower" \
        if len(exact) == 2 and max(exact.values()) < FLOOR_EXACT else None
    p4_floor = None
    if relational is not None and vision is not None:
        at_chance = {r: (_mean(_scores(table[r]["test_gt" + VISION], "vision_acc")), majority_share(table, r)) for r in ("full", "static_geometry")}
        if all(acc - chance < CHANCE_MARGIN for acc, chance in at_chance.values()):
            p4_floor = "vision answers at the most frequent answer's share: " + ", ".join(f"{r} {a:.3f} vs {c:.3f}" for r, (a, c) in at_chance.items())

    return [
        f"- P1 {word(p1, hard_soft, dyn_soft_gt, dyn_soft)}: ground-truth boxes, hard - soft {fmt(hard_soft)}, dynamic - soft {fmt(dyn_soft_gt)}; "
        f"sigma-0.2 boxes, dynamic - soft {fmt(dyn_soft)} (threshold: within 1 point; >= +3 with the CI above 0).",
        f"- P2 {word(p2, seg, lmask)}: regions > 30% foreign pixels (ground-truth boxes), segmentation - box masks {fmt(seg)} (>= +5); "
        f"attention pooling with - without L_mask {fmt(lmask)} (>= +2).",
        f"- P3 {word(p3, p3d, floor=p3_floor)}: caption exactness on regions whose box intersects another, consistency 10x - weight 0 {fmt(p3d)} (lower: CI below 0).",
        f"- P4 {word(p4, relational, vision, floor=p4_floor)}: adaptive - static-with-geometry prompts (ground-truth boxes), relational referring "
        f"expressions ranked among the image's true boxes (gt-ranking hit, not generated text) {fmt(relational)}; one-anchor vision "
        f"questions answered by the LM (exact answer) {fmt(vision)} (each >= +5).",
    ]


def plot(table, rows, path: Path) -> None:
    """Accuracy vs test-box IoU per row (stage-1 rows: region accuracy; stage-2 rows: text accuracy),
    pooling the gt, det01, det02 and loose variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = BREAKDOWNS["box_iou"]
    centres = {bin_of((lo + min(hi, 1.0)) / 2, bins): (lo + min(hi, 1.0)) / 2 for lo, hi in bins}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, stage2, score, title in ((axes[0], False, "region_acc", "stage 1: region accuracy (head)"), (axes[1], True, "text_acc", "stage 2: text accuracy (caption)")):
        for name, row in rows.items():
            if ("stage2" in row) != stage2 or name not in table:
                continue
            pooled = [r for split in ("test_gt", "test_det01", "test_det02", "test_loose") for regions in table[name].get(split, {}).values() for r in regions.values()]
            groups = breakdown(pooled, score)["box_iou"]
            xs = sorted((centres[label], mean) for label, (mean, count) in groups.items() if count >= 5)
            if xs:
                ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("IoU of the test box with the true box")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def job_seconds(root: Path) -> float:
    """The seconds every finished run of the suite recorded in its done marker (``finished`` / ``evaluated``), added up."""
    total = 0.0
    for marker in [*root.rglob("finished"), *root.rglob("evaluated")]:
        try:
            total += float(marker.read_text().split()[0])
        except (ValueError, IndexError):
            continue
    return total


def report_text(root: Path, table, rows, size, choice, seconds: float, plot_name: Optional[str]) -> str:
    """The Markdown of the hard suite's results (between :data:`BEGIN` and :data:`END`)."""
    s1 = [n for n, r in rows.items() if "stage2" not in r]
    s2 = [n for n, r in rows.items() if "stage2" in r]
    parts = [BEGIN, "", "## Hard-mode results", "",
             f"Made by `fineregion-pl ablations --suite hard`: this invocation {seconds / 60:.0f} min; the runs' own recorded times "
             f"add up to {job_seconds(root) / 3600:.1f} job-hours (as recorded; two runs side by side take about half that in wall time on a quiet machine, more when other jobs share the cores); "
             f"{size.train_images} training images, "
             f"{size.test_images} test images per variant; stage 1 {size.stage1_steps} steps, stage 2 {size.stage2_steps} steps. "
             f"Recipe chosen on val: `{choice['key']}` = {choice['value']} (val region accuracy on {choice['split']}: "
             + ", ".join(f"{k}: {v:.3f}" for k, v in choice["val_region_acc"].items()) + "). Cells: mean over seeds and regions "
             "(difference from the bold reference row in points, paired bootstrap 95% CI over seeds and regions).", ""]
    if s1:
        parts += ["### Stage-1 rows: region accuracy of the category head, by test boxes", ""]
        parts += _table(table, rows, s1, STAGE1_REFERENCE, [(split, split, "region_acc") for split in STAGE1_SPLITS])
        parts += ["", "Regions whose box is > 30% foreign pixels (ground-truth boxes):", ""]
        parts += _table(table, rows, s1, STAGE1_REFERENCE, [("test_gt, foreign > 30%", "test_gt", "region_acc", FOREIGN)])
    if s2:
        parts += ["", "### Stage-2 rows: generated captions", ""]
        cols = [(f"text acc. {split}", split, "text_acc") for split in ("test_gt", "test_det02")]
        cols += [(f"{a} acc.", "test_gt", f"{a}_acc") for a in ("colour", "size")]
        cols += [("exact", "test_gt", "exact"), ("exact, intersecting", "test_gt", "exact", INTERSECTING)]
        parts += _table(table, rows, s2, STAGE2_REFERENCE, cols)
        parts += ["", "Grounding and questions (ground-truth boxes unless named; gt-ranking picks among the image's "
                  "true boxes, which is not REC):", ""]
        parts += _table(table, rows, s2, STAGE2_REFERENCE, [
            ("gt-ranking, all expressions", "test_gt" + EXPRESSIONS, "ranking_acc"),
            ("gt-ranking, relational expressions", "test_gt" + EXPRESSIONS, "ranking_acc", RELATIONAL),
            ("grounding among IoU 0.3-0.7 proposals", "test_ground" + EXPRESSIONS, "ranking_acc"),
            ("one-anchor vision questions", "test_gt" + VISION, "vision_acc"),
        ])
        parts += ["", "| row | spatial acc. (two-region questions, geometry) | vision questions answered | chance of the most frequent answer |", "|---|---|---|---|"]
        for name in s2:
            spatial = _results_json(root, name, size.stage2_seeds, "test_gt", "spatial", "accuracy")
            count = _results_json(root, name, size.stage2_seeds, "test_gt", "vision_questions", "questions")
            majority = majority_share(table, name)
            parts.append(f"| `{name}` | {'-' if spatial is None else f'{spatial:.3f}'} | {'-' if count is None else f'{count:.0f}'} | {'-' if majority is None else f'{majority:.3f}'} |")
    parts += ["", "### Breakdowns (ground-truth boxes; region accuracy for stage-1 rows, text accuracy for stage-2 rows)", ""]
    for key in ("foreign_share", "visible_fraction", "size"):
        labels = [b if isinstance(b, str) else bin_of(b[0], BREAKDOWNS[key]) for b in BREAKDOWNS[key]]
        parts += [f"| row | {key}: " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for name in rows:
            score = "text_acc" if "stage2" in rows[name] else "region_acc"
            pooled = [r for regions in table.get(name, {}).get("test_gt", {}).values() for r in regions.values()]
            groups = breakdown(pooled, score)[key]
            parts.append(f"| `{name}` | " + " | ".join(f"{groups[label][0]:.3f} (n={groups[label][1]})" if label in groups else "-" for label in labels) + " |")
        parts.append("")
    if plot_name:
        parts += [f"![accuracy vs test-box IoU]({plot_name})", ""]
    parts += ["### The predictions", ""] + verdicts(table) + ["", END]
    return "\n".join(parts) + "\n"


def write_report(root: Path, data: Path, rows: dict[str, dict], size, choice: dict, out: Optional[str], seconds: float, smoke: bool) -> dict:
    """Collect, write the report into ``out`` (its hard-suite section replaced) and the plot; return the per-split means."""
    table = collect(root, data, rows, size)
    target = Path(out) if out else None
    if target is not None and smoke and target.resolve() == Path("docs/results.md").resolve():
        target = root / "results.md"  # toy numbers never go into the project's docs
    plot_name = None
    if target is not None:
        plot(table, rows, target.parent / PLOT)
        plot_name = PLOT
    text = report_text(root, table, rows, size, choice, seconds, plot_name)
    print("\n" + text)
    if target is not None:
        old = target.read_text() if target.is_file() else ""
        if BEGIN in old and END in old:
            new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) + 1 :]
        else:
            new = old.replace("Results: pending (the suite has not been run yet).\n", "") + ("\n" if old else "") + text
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(new)
        print(f"hard-suite results written to {target}")
    summary = {name: {split: _mean(_scores(runs, "text_acc" if "stage2" in rows[name] else "region_acc")) for split, runs in splits.items() if ":" not in split}
               for name, splits in table.items()}  # per-region scores; the per-expression and per-question entries are in the report
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
