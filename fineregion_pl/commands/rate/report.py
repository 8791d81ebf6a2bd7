"""``fineregion-pl rate report``: the paper's Table 3 from a study, with agreement and confidence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fineregion_pl.commands.rate import stats
from fineregion_pl.commands.rate.store import CRITERIA, Study
from fineregion_pl.model.errors import BadInputError


def _number(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(ci: list, digits: int = 2) -> str:
    return "n/a" if ci[0] is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _p(value: Optional[float]) -> str:
    return "n/a" if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def build_report(study: Study, reference: Optional[str] = None, seed: int = 0, resamples: int = stats.RESAMPLES) -> dict:
    """Everything the report says, as plain values (the JSON file)."""
    models, ratings, skips = study.models(), study.ratings(), study.skips()
    if not ratings:
        raise BadInputError(f"{study.path} has no ratings yet: raters rate through `fineregion-pl rate serve {study.path}`")
    reference = reference or models[0]
    if reference not in models:
        raise BadInputError(f"--reference {reference!r} is not a model of {study.path} (models: {', '.join(models)})")
    raters = {}
    for name in study.raters():
        progress = study.progress(name)
        raters[name] = {"rated": progress.rated, "skipped": progress.skipped, "left": progress.left}
    agreement = stats.agreement(ratings, CRITERIA, seed, min(resamples, 1000))
    return {
        "study": str(study.path),
        "counts": study.counts(),
        "models": models,
        "criteria": list(CRITERIA),
        "scale": "1 (poor) to 5 (excellent)",
        "raters": raters,
        "means": stats.model_means(ratings, models, CRITERIA, seed, resamples),
        "agreement": agreement,
        "untrusted": [c for c in CRITERIA if agreement[c]["verdict"] == "too low to trust the means"],
        "reference": reference,
        "comparisons": stats.paired_comparisons(ratings, models, reference, CRITERIA, seed, resamples),
        "skips": {reason: sum(s["reason"] == reason for s in skips) for reason in sorted({s["reason"] for s in skips})},
        "method": {
            "mean_ci": f"{int(stats.LEVEL * 100)}% BCa bootstrap over regions ({resamples} resamples, seed {seed}); raters fixed",
            "alpha": "Krippendorff's alpha, ordinal, values 1-5 (krippendorff package); units = captions; CI: bootstrap over captions",
            "paired": "per region, mean over raters of (model - reference); bootstrap CI over regions; Wilcoxon signed-rank (scipy, zero_method=pratt)",
        },
    }


def report_markdown(report: dict, plot_name: Optional[str] = None) -> str:
    """The report as markdown: Table 3, agreement, paired comparisons, skips."""
    counts, models = report["counts"], report["models"]
    lines = [f"# Human evaluation: {Path(report['study']).name}", ""]
    rater_text = ", ".join(f"{n} ({r['rated']} rated, {r['skipped']} skipped, {r['left']} left)" for n, r in report["raters"].items())
    lines += [f"{counts['items']} regions x {len(models)} models = {counts['captions']} captions; raters: {rater_text}.",
              f"Scale {report['scale']}. Means with {report['method']['mean_ci']}.", ""]
    agreement = report["agreement"]
    if report["untrusted"]:
        named = ", ".join(f"{c} (alpha {_number(agreement[c]['alpha'], 3)} < {stats.TENTATIVE})" for c in report["untrusted"])
        lines += [f"**Agreement is too low to trust the means for: {named}.** The raters disagree too much on "
                  "these criteria for their means or the comparisons below to mean anything: sharpen the instructions, "
                  "rate a few examples together, and rate again.", ""]
    unmeasured = [c for c in CRITERIA if agreement[c]["verdict"].startswith("not measurable")]
    if unmeasured:
        lines += [f"**Agreement cannot be measured for: {', '.join(unmeasured)}** ({agreement[unmeasured[0]]['verdict']}): the means are not checked against a second rater.", ""]

    lines += ["## Table 3", "", "| model | " + " | ".join(CRITERIA) + " | ratings | raters |", "|---" * (len(CRITERIA) + 3) + "|"]
    for model in models:
        row = report["means"][model]
        cells = [f"{_number(row[c]['mean'])} {_interval(row[c]['ci'])}" for c in CRITERIA]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {row['ratings']} | {row['raters']} |")

    lines += ["", "## Agreement between raters (Krippendorff's alpha, ordinal)", "",
              "| criterion | alpha | 95% CI | captions rated by 2+ raters | verdict |", "|---|---|---|---|---|"]
    for c in CRITERIA:
        a = agreement[c]
        lines.append(f"| {c} | {_number(a['alpha'], 3)} | {_interval(a['ci'], 3)} | {a['units']} | {a['verdict']} |")
    lines += ["", f"Reliable from alpha {stats.RELIABLE:.3f}; tentative conclusions only from {stats.TENTATIVE}; below, none (Krippendorff 2004)."]

    lines += ["", f"## Against the reference: {report['reference']}", "",
              "| model | criterion | difference | 95% CI | regions | better / tied / worse | Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for model, rows in report["comparisons"].items():
        for c in CRITERIA:
            r = rows[c]
            difference = "n/a" if r["difference"] is None else f"{r['difference']:+.2f}"
            lines.append(f"| {model} | {c} | {difference} | {_interval(r['ci'])} | {r['items']} | {r['better']} / {r['tied']} / {r['worse']} | {_p(r['wilcoxon_p'])} |")
    tests = sum(len(rows) for rows in report["comparisons"].values())
    lines += ["", f"Difference = per region, the mean over raters of (model - {report['reference']}). "
              f"p-values are not corrected for the {tests} tests of this table."]
    if report["skips"]:
        lines += ["", "## Skipped regions", "", "| reason | skips |", "|---|---|"] + [f"| {reason} | {n} |" for reason, n in report["skips"].items()]
    if plot_name:
        lines += ["", f"![rating distributions]({plot_name})"]
    return "\n".join(lines) + "\n"


def report(study: str, out: Optional[str] = None, reference: Optional[str] = None, seed: int = 0, resamples: int = stats.RESAMPLES, plot: bool = True) -> dict:
    """Table 3 of a study: per model and criterion the mean rating with a 95% bootstrap CI, the
    number of ratings and raters; Krippendorff's alpha per criterion; each model against a reference
    (bootstrap CI of the difference, Wilcoxon signed-rank test); a plot of the rating distributions.

    Writes ``OUT/report.md``, ``OUT/report.json`` and ``OUT/distributions.png``, and prints the markdown.

    Args:
        study: the study file (``rate prepare --study``).
        out: output folder (default: ``<study>_report`` beside the study file).
        reference: the model the others are compared with (default: the first given to ``rate prepare``).
        seed: seed of the bootstrap.
        resamples: bootstrap resamples.
        plot: draw the rating distributions (needs matplotlib: ``pip install -e ".[rate]"``).
    """
    opened = Study(study)
    result = build_report(opened, reference, seed, resamples)
    folder = Path(out) if out else opened.path.with_name(opened.path.stem + "_report")
    folder.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if plot:
        from fineregion_pl.commands.rate.plot import plot_distributions

        try:
            plot_distributions(opened.ratings(), result["models"], CRITERIA, folder / "distributions.png", title=Path(study).name)
            plot_name = "distributions.png"
        except ModuleNotFoundError as err:
            if err.name != "matplotlib":
                raise
            print('fineregion-pl: warning: no plot: matplotlib is not installed (pip install -e ".[rate]")')
    text = report_markdown(result, plot_name)
    (folder / "report.md").write_text(text, encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    print(text)
    print(f"written: {folder / 'report.md'}, {folder / 'report.json'}" + (f", {folder / plot_name}" if plot_name else ""))
    return result
