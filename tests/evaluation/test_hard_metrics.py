"""Hard-suite metrics: caption parsing, per-region scores, breakdown bins, and the paired bootstrap's coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fineregion_pl.evaluation.hard_metrics import bin_of, breakdown, paired_bootstrap, parse_caption, region_scores, scored_regions


def test_captions_are_parsed_into_attributes():
    assert parse_caption("a tiny red circle partly hidden") == {"shape": "circle", "colour": "red", "size": "tiny", "hidden": True}
    assert parse_caption("a large square") == {"shape": "square", "colour": None, "size": "large", "hidden": False}
    facts = {"category": "circle", "colour": "red", "size": "small"}
    scores = region_scores({"caption": "a medium red circle", "references": ["a small red circle"], "category": "square"}, facts)
    assert scores == {"region_acc": 0.0, "text_acc": 1.0, "shape_acc": 1.0, "colour_acc": 1.0, "size_acc": 0.0, "exact": 0.0}
    assert region_scores({"category": "circle"}, facts) == {"region_acc": 1.0}  # a stage-1 prediction has no caption


def test_scored_regions_join_predictions_with_facts_and_breakdowns_bin_them(tmp_path):
    facts = [{"image_id": "t-0", "region_id": i, "category": "circle", "colour": "red", "size": s, "box_iou": iou, "visible_fraction": 1.0, "foreign_share": 0.0}
             for i, (s, iou) in enumerate([("tiny", 0.55), ("large", 0.99), ("large", 0.97)])]
    facts.append({"image_id": "t-0", "region_id": 3, "box_iou": 0.4, "proposal_of": 0, "category": None})
    (tmp_path / "regions.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    preds = [{"image_id": "t-0", "region_id": i, "category": c} for i, c in enumerate(["circle", "circle", "cross", "cross"])]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    regions = scored_regions(tmp_path / "p.jsonl", tmp_path / "regions.jsonl")
    assert len(regions) == 3  # the proposal is not a region to score
    table = breakdown(regions.values(), "region_acc")
    assert table["box_iou"] == {"0.5-0.6": (1.0, 1), "0.95-1": (0.5, 2)}
    assert table["size"] == {"tiny": (1.0, 1), "large": (0.5, 2)}
    assert bin_of(0.3, [(0.0, 0.1), (0.1, 0.3), (0.3, 1.01)]) == "0.3-1"
    (tmp_path / "short.jsonl").write_text(json.dumps(preds[0]) + "\n")
    with pytest.raises(ValueError, match="2 of 3 regions"):
        scored_regions(tmp_path / "short.jsonl", tmp_path / "regions.jsonl")


def test_paired_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    true_diff, covered, trials = 0.04, 0, 120
    for trial in range(trials):
        row, full = {}, {}
        for seed in range(5):
            base = rng.uniform(0.5, 0.8, 300)  # per-region difficulty, shared by both rows (paired)
            shift = true_diff + rng.normal(0, 0.01)  # seed-to-seed variation of the difference
            full[seed] = {k: float(rng.random() < p) for k, p in enumerate(base)}
            row[seed] = {k: float(rng.random() < min(1, p + shift)) for k, p in enumerate(base)}
        _, low, high = paired_bootstrap(row, full, resamples=300, seed=trial)
        covered += low <= true_diff <= high
    print(f"paired bootstrap: 95% CI covered the true difference in {covered}/{trials} simulated suites")
    assert 0.85 <= covered / trials <= 1.0, covered / trials
    with pytest.raises(ValueError, match="share no seed"):
        paired_bootstrap({0: {}}, {1: {}})


from fineregion_pl.data.synthetic import SHAPES  # noqa: E402


def _p4_table(relational_gain: float, vision_gain: float, vision_base: float = 0.3) -> dict:
    """full and static_geometry over 3 seeds: 60 relational and 60 attribute expressions, 60 questions."""
    from fineregion_pl.commands.hard_report import EXPRESSIONS, VISION

    table: dict = {}
    for name, gain in (("static_geometry", (0.0, 0.0)), ("full", (relational_gain, vision_gain))):
        expressions, questions = {}, {}
        for seed in range(3):
            expressions[seed] = {(f"i{k}", k): {"expression_kind": "relational" if k < 60 else "attribute",
                                                "ranking_acc": float(k % 100 < 100 * (0.4 + (gain[0] if k < 60 else 0.0)) * 0.6)} for k in range(120)}
            questions[seed] = {(f"i{k}", "q"): {"vision_acc": float(k < 60 * (vision_base + gain[1])), "answer": SHAPES[k % 5]} for k in range(60)}
        table[name] = {"test_gt" + EXPRESSIONS: expressions, "test_gt" + VISION: questions}
    return table


def test_p4_verdict_reads_relational_ranking_and_vision_answers():
    from fineregion_pl.commands.hard_report import majority_share, verdicts

    held = verdicts(_p4_table(0.5, 0.5))[3]
    assert held.startswith("- P4 **held**") and "+50.0 points" in held, held
    refuted = verdicts(_p4_table(0.5, 0.0))[3]  # relational ranking better, vision answers not
    assert refuted.startswith("- P4 **refuted**") and "+0.0 points [+0.0, +0.0]" in refuted, refuted
    assert verdicts({})[3].startswith("- P4 not measured")
    assert majority_share(_p4_table(0.0, 0.0), "full") == 0.2  # five answers, equally often
    at_chance = verdicts(_p4_table(0.5, 0.0, vision_base=0.2))[3]  # both rows answer like always naming one shape
    assert at_chance.startswith("- P4 **not separable here** (vision answers at the most frequent answer's share"), at_chance
