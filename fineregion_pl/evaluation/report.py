"""``results.json`` and a Markdown table a person can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fineregion_pl.data.shards import write_json_atomic


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of every numeric metric: one row per ``section / metric``."""
    rows = ["| section | metric | value |", "|---|---|---|"]
    for section, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown = f"{value:.4f}" if isinstance(value, float) else str(value)
                rows.append(f"| {section} | {name} | {shown} |")
    return "\n".join(rows)


def write_results(results: dict[str, Any], out_dir: Path, title: str = "Results") -> Path:
    """Write ``out_dir/results.json`` and ``out_dir/results.md``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(f"# {title}\n\n{results_table(results)}\n", encoding="utf-8")
    return out_dir / "results.json"
