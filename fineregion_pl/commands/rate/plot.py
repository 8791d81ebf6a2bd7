"""The rating distributions of a study as one picture: per criterion, each model's share of 1..5."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from fineregion_pl.commands.rate.store import SCALE


def plot_distributions(ratings: Sequence[dict], models: Sequence[str], criteria: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Grouped bars: for each criterion, the share of ratings at each score, one bar colour per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(criteria), figsize=(4.2 * len(criteria), 3.4), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(models))
    for axis, criterion in zip(axes[0], criteria):
        for m, model in enumerate(models):
            values = [r[criterion] for r in ratings if r["model"] == model]
            counts = Counter(values)
            shares = [counts[s] / len(values) if values else 0.0 for s in SCALE]
            axis.bar([s - 0.4 + width * (m + 0.5) for s in SCALE], shares, width=width, label=f"{model} (n={len(values)})")
        axis.set_title(criterion)
        axis.set_xticks(list(SCALE), ["1\npoor", "2", "3", "4", "5\nexcellent"])
        axis.set_xlabel("rating")
    axes[0][0].set_ylabel("share of ratings")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
