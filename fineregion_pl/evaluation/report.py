"""``results.json`` and a Markdown report a person can read: the results card, then the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fineregion_pl.data.shards import write_json_atomic
from fineregion_pl.evaluation.card import card_markdown

_NOT_SCALED = ("candidates_per_sentence", "seconds")  # floats that are not fractions


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of every numeric metric: one row per ``section / metric`` (the card is not a section).

    Fractions are also shown x 100, the scale the papers' tables print (METEOR 16.2 = 0.162).
    """
    rows = ["| section | metric | value | x 100 |", "|---|---|---|---|"]
    for section, metrics in results.items():
        if section == "card" or not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown = f"{value:.4f}" if isinstance(value, float) else str(value)
                scaled = f"{100 * value:.1f}" if isinstance(value, float) and name not in _NOT_SCALED else ""
                rows.append(f"| {section} | {name} | {shown} | {scaled} |")
    return "\n".join(rows)


def results_markdown(results: dict[str, Any], title: str = "Results") -> str:
    """``# title``, the results card (when there is one) and the table."""
    card = f"## Results card\n\n{card_markdown(results['card'])}\n\n## Scores\n\n" if isinstance(results.get("card"), dict) else ""
    return f"# {title}\n\n{card}{results_table(results)}\n"


def write_results(results: dict[str, Any], out_dir: Path, title: str = "Results") -> Path:
    """Write ``out_dir/results.json`` and ``out_dir/results.md``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(results_markdown(results, title), encoding="utf-8")
    return out_dir / "results.json"
