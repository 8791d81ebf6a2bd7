"""The statistics of a rating study: means with bootstrap CIs, Krippendorff's alpha, paired comparisons.

Input is a list of ratings ``{"rater", "item", "model", <criterion>: 1..5}`` (what
:meth:`~fineregion_pl.commands.rate.store.Study.ratings` returns). Choices, and why:

- **Means** are over all ratings of a model. Their 95% CI is a BCa bootstrap over *items*
  (regions), with each resampled item keeping all its ratings (``scipy.stats.bootstrap``, paired
  sums and counts): ratings of one region are not independent, regions are. Raters are kept
  fixed, so the CI is for "these raters' mean rating over the population of regions".
- **Agreement** is Krippendorff's alpha (ordinal, values 1-5) from the ``krippendorff`` package,
  units = captions, with a bootstrap CI over units.
- **Paired comparisons** use, per item, the mean over raters of (model - reference) from raters who
  rated both captions of the item: its mean with a bootstrap CI over items, and the Wilcoxon
  signed-rank test (``scipy.stats.wilcoxon``, ``zero_method="pratt"``: ties stay in the ranking,
  as they are common on a 5-point scale) on those per-item differences.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Optional

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
# Krippendorff (2004, Content Analysis, 2nd ed., p. 241): rely on alpha >= .800, draw only tentative
# conclusions for .667 <= alpha < .800, and none below
RELIABLE, TENTATIVE = 0.800, 0.667


def _bootstrap(data: tuple[np.ndarray, ...], statistic, seed: int, resamples: int = RESAMPLES) -> tuple[Optional[float], Optional[float]]:
    """A BCa bootstrap CI (percentile when BCa is undefined) over the first axis of paired arrays;
    ``(None, None)`` from fewer than two items (no interval; None, not NaN, so report.json stays JSON)."""
    from scipy.stats import bootstrap

    if len(data[0]) < 2:
        return None, None
    point = float(statistic(*data, axis=-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate data (every value equal) is handled below
        for method in ("BCa", "percentile"):
            result = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples, confidence_level=LEVEL, method=method, rng=np.random.default_rng(seed))
            low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
            if np.isfinite(low) and np.isfinite(high):
                return low, high
    return point, point  # every resample gives the same value


def _ratio(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return values.mean(axis=axis)


def model_means(ratings: Sequence[dict], models: Sequence[str], criteria: Sequence[str], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Per model and criterion: ``mean``, ``ci`` (95% bootstrap over items), ``ratings``, ``items``, ``raters``."""
    table: dict = {}
    for m, model in enumerate(models):
        rows = [r for r in ratings if r["model"] == model]
        table[model] = {"ratings": len(rows), "items": len({r["item"] for r in rows}), "raters": len({r["rater"] for r in rows})}
        for c, criterion in enumerate(criteria):
            sums: dict = defaultdict(float)
            counts: dict = defaultdict(int)
            for r in rows:
                sums[r["item"]] += r[criterion]
                counts[r["item"]] += 1
            items = sorted(sums)
            if not items:
                table[model][criterion] = {"mean": None, "ci": [None, None]}
                continue
            s, n = np.array([sums[i] for i in items]), np.array([counts[i] for i in items], dtype=float)
            low, high = _bootstrap((s, n), _ratio, seed + 1000 * m + c, resamples)
            table[model][criterion] = {"mean": float(s.sum() / n.sum()), "ci": [low, high]}
    return table


def reliability_matrix(ratings: Sequence[dict], criterion: str) -> tuple[np.ndarray, list[str]]:
    """``(raters x units)`` matrix of one criterion (NaN where a rater did not rate a unit), units = (item, model)."""
    raters = sorted({r["rater"] for r in ratings})
    units = sorted({(r["item"], r["model"]) for r in ratings})
    row, column = {name: n for n, name in enumerate(raters)}, {u: n for n, u in enumerate(units)}
    matrix = np.full((len(raters), len(units)), np.nan)
    for r in ratings:
        matrix[row[r["rater"]], column[(r["item"], r["model"])]] = r[criterion]
    return matrix, raters


def alpha(matrix: np.ndarray) -> Optional[float]:
    """Krippendorff's ordinal alpha on the 1-5 scale (the ``krippendorff`` package), None when undefined."""
    import krippendorff

    pairable = (np.sum(~np.isnan(matrix), axis=0) >= 2) if matrix.size else np.array([], dtype=bool)
    values = matrix[:, pairable] if matrix.size else matrix
    if matrix.shape[0] < 2 or not pairable.any() or len(np.unique(values[~np.isnan(values)])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=[1, 2, 3, 4, 5]))


def agreement(ratings: Sequence[dict], criteria: Sequence[str], seed: int = 0, resamples: int = 1000) -> dict:
    """Per criterion: ``alpha``, ``ci`` (bootstrap over units), ``units`` rated by two or more raters, ``verdict``."""
    out = {}
    for c, criterion in enumerate(criteria):
        matrix, raters = reliability_matrix(ratings, criterion)
        paired = matrix[:, np.sum(~np.isnan(matrix), axis=0) >= 2] if matrix.size else matrix
        value = alpha(matrix)
        ci = [None, None]
        if value is not None and paired.shape[1] >= 2:
            rng = np.random.default_rng(seed + c)
            draws = [alpha(paired[:, rng.integers(0, paired.shape[1], paired.shape[1])]) for _ in range(resamples)]
            draws = np.array([d for d in draws if d is not None])
            if len(draws):
                ci = [float(np.quantile(draws, (1 - LEVEL) / 2)), float(np.quantile(draws, (1 + LEVEL) / 2))]
        out[criterion] = {"alpha": value, "ci": ci, "units": int(paired.shape[1]) if paired.ndim == 2 else 0, "raters": len(raters), "verdict": verdict(value, len(raters))}
    return out


def verdict(value: Optional[float], raters: int) -> str:
    """What an alpha allows one to conclude, in words."""
    if raters < 2:
        return "not measurable: one rater (the means are one person's judgement)"
    if value is None:
        return "not measurable: no caption was rated by two raters with any variation"
    if value >= RELIABLE:
        return "reliable"
    if value >= TENTATIVE:
        return "tentative: draw only tentative conclusions"
    return "too low to trust the means"


def paired_comparisons(ratings: Sequence[dict], models: Sequence[str], reference: str, criteria: Sequence[str], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Each model against ``reference``, per criterion: mean per-item difference with a bootstrap CI,
    Wilcoxon signed-rank p-value, and how many items the model is better / tied / worse on."""
    from scipy.stats import wilcoxon

    scores = {(r["rater"], r["item"], r["model"]): r for r in ratings}
    out: dict = {}
    for m, model in enumerate(models):
        if model == reference:
            continue
        out[model] = {}
        for c, criterion in enumerate(criteria):
            per_item: dict = defaultdict(list)
            for (rater, item, name), r in scores.items():
                if name == model and (rater, item, reference) in scores:
                    per_item[item].append(r[criterion] - scores[(rater, item, reference)][criterion])
            d = np.array([np.mean(per_item[i]) for i in sorted(per_item)])
            entry = {"items": int(len(d)), "better": int((d > 0).sum()), "tied": int((d == 0).sum()), "worse": int((d < 0).sum())}
            if len(d) == 0:
                out[model][criterion] = {**entry, "difference": None, "ci": [None, None], "wilcoxon_p": None}
                continue
            low, high = _bootstrap((d,), _mean, seed + 1000 * m + c, resamples)
            p = 1.0
            if np.any(d != 0):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # small samples: scipy notes it uses the normal approximation
                    p = float(wilcoxon(d, zero_method="pratt").pvalue)
            out[model][criterion] = {**entry, "difference": float(d.mean()), "ci": [low, high], "wilcoxon_p": p}
    return out
