"""The report's statistics: alpha against the ``krippendorff`` package, CI coverage in simulated studies,
paired comparisons against scipy, and what the report says about agreement."""

from __future__ import annotations

import numpy as np
import pytest
from rating_helpers import folder_predictions
from scipy.stats import norm, wilcoxon

from fineregion_pl.commands.rate import stats
from fineregion_pl.commands.rate.prepare import prepare
from fineregion_pl.commands.rate.report import build_report, report_markdown
from fineregion_pl.commands.rate.store import CRITERIA, Study

NAN = np.nan
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units,
# values 1-5, gaps where an observer gave no value; published ordinal alpha 0.815
KRIPPENDORFF_EXAMPLE = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
])


def _study_with_matrix(tmp_path, matrix: np.ndarray) -> Study:
    """A real study of 6 regions x 2 models whose accuracy ratings are ``matrix`` (raters x captions)."""
    folder, files, _ = folder_predictions(tmp_path, images=4)
    prepare([str(f) for f in files], str(folder), study=str(tmp_path / "s.sqlite"), regions=matrix.shape[1] // 2)
    study = Study(tmp_path / "s.sqlite")
    raters = [f"rater-{n}" for n in range(matrix.shape[0])]
    study.add_raters(raters)
    import sqlite3

    with sqlite3.connect(study.path) as conn:  # captions in the report's unit order: (item, model name)
        units = conn.execute("SELECT c.id FROM captions c JOIN models m ON c.model = m.id ORDER BY c.item, m.name").fetchall()
    for r, rater in enumerate(raters):
        for (caption,), value in zip(units, matrix[r]):
            if not np.isnan(value):
                study.save_rating(rater, caption, {"accuracy": int(value), "relevance": int(value), "fluency": 6 - int(value)})
    return study


def test_alpha_equals_the_krippendorff_package_on_a_hand_built_matrix(tmp_path):
    import krippendorff

    study = _study_with_matrix(tmp_path, KRIPPENDORFF_EXAMPLE)
    report = build_report(study, resamples=200)
    expected = krippendorff.alpha(reliability_data=KRIPPENDORFF_EXAMPLE, level_of_measurement="ordinal", value_domain=[1, 2, 3, 4, 5])
    assert report["agreement"]["accuracy"]["alpha"] == pytest.approx(expected, abs=1e-12)
    assert round(expected, 3) == 0.815  # the value the paper publishes for this matrix
    # fluency is 6 - value: the same disagreements on a mirrored scale, the same ordinal alpha
    assert report["agreement"]["fluency"]["alpha"] == pytest.approx(expected, abs=1e-12)
    assert report["agreement"]["accuracy"]["units"] == 11  # the 12th unit has one value: not pairable
    assert report["agreement"]["accuracy"]["verdict"] == "reliable"
    low, high = report["agreement"]["accuracy"]["ci"]
    assert low < expected < high


def _simulated_ratings(rng, mus, items=40, bias=(-0.3, 0.0, 0.4), item_sd=0.8, noise_sd=0.7) -> list[dict]:
    """Three raters rate every caption of ``items`` regions: round(item quality + rater bias + noise), clipped to 1-5."""
    rows = []
    for item in range(items):
        for model, per_criterion in mus.items():
            quality = {c: mu + rng.normal(0, item_sd) for c, mu in per_criterion.items()}
            for r, b in enumerate(bias):
                rows.append({"rater": f"r{r}", "item": item, "model": model,
                             **{c: int(np.clip(np.rint(quality[c] + b + rng.normal(0, noise_sd)), 1, 5)) for c in per_criterion}})
    return rows


def _true_mean(mu, bias=(-0.3, 0.0, 0.4), item_sd=0.8, noise_sd=0.7) -> float:
    """The expected rating of the simulation, exactly: the latent score is normal, cut at k +- 0.5, clipped."""
    sd = np.hypot(item_sd, noise_sd)
    means = []
    for b in bias:
        cuts = norm.cdf((np.array([1.5, 2.5, 3.5, 4.5]) - mu - b) / sd)
        probabilities = np.diff(np.concatenate([[0.0], cuts, [1.0]]))
        means.append(float(np.dot(probabilities, [1, 2, 3, 4, 5])))
    return float(np.mean(means))


def test_cis_cover_the_true_mean_in_200_simulated_studies():
    mus = {"ours": {"accuracy": 3.9, "relevance": 3.5, "fluency": 4.4}, "baseline": {"accuracy": 3.3, "relevance": 3.4, "fluency": 2.2}}
    truth = {m: {c: _true_mean(mu) for c, mu in per.items()} for m, per in mus.items()}
    rng = np.random.default_rng(0)
    covered = {(m, c): 0 for m in mus for c in CRITERIA}
    covered_difference = {c: 0 for c in CRITERIA}
    studies = 200
    for study in range(studies):
        ratings = _simulated_ratings(rng, mus)
        means = stats.model_means(ratings, list(mus), CRITERIA, seed=study, resamples=1000)
        paired = stats.paired_comparisons(ratings, list(mus), "baseline", CRITERIA, seed=study, resamples=1000)
        for m in mus:
            for c in CRITERIA:
                low, high = means[m][c]["ci"]
                covered[(m, c)] += low <= truth[m][c] <= high
        for c in CRITERIA:
            low, high = paired["ours"][c]["ci"]
            covered_difference[c] += low <= truth["ours"][c] - truth["baseline"][c] <= high
    rates = {f"{m}/{c}": n / studies for (m, c), n in covered.items()} | {f"difference/{c}": n / studies for c, n in covered_difference.items()}
    print("coverage of the 95% CIs in 200 simulated studies:", rates)
    assert all(rate >= 0.90 for rate in rates.values()), rates


def test_paired_comparison_is_scipys_wilcoxon_on_per_region_differences():
    ratings = []
    ours = [5, 4, 4, 3, 5, 2, 4, 5]
    base = [3, 4, 2, 3, 2, 3, 1, 2]
    for item, (a, b) in enumerate(zip(ours, base)):
        for rater, shift in (("x", 0), ("y", 1 if item % 3 == 0 else 0)):
            ratings.append({"rater": rater, "item": item, "model": "ours", "accuracy": min(5, a + shift), "relevance": a, "fluency": a})
            ratings.append({"rater": rater, "item": item, "model": "base", "accuracy": b, "relevance": b, "fluency": b})
    result = stats.paired_comparisons(ratings, ["ours", "base"], "base", CRITERIA, resamples=500)["ours"]
    d = np.array(ours) - np.array(base)
    assert result["relevance"]["difference"] == pytest.approx(d.mean())
    assert result["relevance"]["wilcoxon_p"] == pytest.approx(wilcoxon(d, zero_method="pratt").pvalue)
    assert (result["relevance"]["better"], result["relevance"]["tied"], result["relevance"]["worse"]) == (5, 2, 1)
    shifted = np.array([np.mean([min(5, a + s) - b for s in (0, 1 if i % 3 == 0 else 0)]) for i, (a, b) in enumerate(zip(ours, base))])
    assert result["accuracy"]["difference"] == pytest.approx(shifted.mean())
    low, high = result["relevance"]["ci"]
    assert low < d.mean() < high


def test_means_are_over_all_ratings_and_count_ratings_and_raters():
    ratings = [{"rater": r, "item": i, "model": "m", "accuracy": v, "relevance": 3, "fluency": 3}
               for r, values in (("x", [5, 4, 3]), ("y", [4, 4])) for i, v in enumerate(values)]
    table = stats.model_means(ratings, ["m"], CRITERIA, resamples=500)["m"]
    assert table["accuracy"]["mean"] == pytest.approx(20 / 5) and table["ratings"] == 5 and table["raters"] == 2 and table["items"] == 3
    assert table["relevance"]["ci"] == [3.0, 3.0]  # every rating equal: the interval is the point
    one = stats.model_means([r for r in ratings if r["item"] == 0], ["m"], CRITERIA, resamples=500)["m"]
    assert one["accuracy"]["mean"] == 4.5 and one["accuracy"]["ci"] == [None, None]  # one region: no interval (JSON null, not NaN)


def test_the_report_says_plainly_when_agreement_is_too_low(tmp_path):
    rng = np.random.default_rng(1)
    noise = rng.integers(1, 6, size=(2, 12)).astype(float)  # two raters who agree only by chance
    study = _study_with_matrix(tmp_path, noise)
    report = build_report(study, resamples=200)
    value = report["agreement"]["accuracy"]["alpha"]
    assert value < stats.TENTATIVE and "accuracy" in report["untrusted"]
    text = report_markdown(report)
    assert f"**Agreement is too low to trust the means for: accuracy (alpha {value:.3f} < 0.667)" in text
    assert "| accuracy | " in text and "too low to trust the means |" in text


def test_one_rater_means_agreement_cannot_be_measured(tmp_path):
    study = _study_with_matrix(tmp_path, KRIPPENDORFF_EXAMPLE[1:2, :])
    report = build_report(study, resamples=200)
    assert report["agreement"]["accuracy"]["alpha"] is None
    assert "**Agreement cannot be measured for: accuracy, relevance, fluency** (not measurable: one rater" in report_markdown(report)
