"""``fineregion-pl ablations --suite hard``: the rows, the plan, the run-time extrapolation, and the whole suite at toy size."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fineregion_pl.commands.ablations import ablations
from fineregion_pl.commands.hard_report import BEGIN, END
from fineregion_pl.commands.hard_suite import FULL, SMOKE, STAGE1_ORDER, STAGE2_ORDER, estimate_seconds, load_hard_rows
from fineregion_pl.model.errors import FineRegionError


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def test_every_row_changes_one_thing_from_the_row_it_is_compared_with():
    rows = load_hard_rows()
    assert list(rows) == STAGE1_ORDER + STAGE2_ORDER
    # (row, compared with, the one setting that differs)
    pairs = [("s1_no_lmask", "s1_full", {"model.init_args.mask_loss_weight"}),
             ("s1_segmentation", "s1_full", {"model.init_args.use_segmentation"}),
             ("s1_full", "s1_dynamic", {"model.init_args.encoder.pooling"}),
             ("s1_soft", "s1_dynamic", {"model.init_args.dynamic.strength"})]
    for row, other, differs in pairs:
        a, b = _leaves(rows[row]["stage1"]), _leaves(rows[other]["stage1"])
        assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == differs, row
    for row in STAGE2_ORDER:  # stage-2 rows share the full model's stage 1 and differ in one stage-2 setting
        assert rows[row]["stage1"] == rows["s1_full"]["stage1"]
        a, b = _leaves(rows[row]["stage2"]), _leaves(rows["full"]["stage2"])
        assert len({k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}) == (0 if row == "full" else 1), row
    with pytest.raises(ValueError, match="unknown hard-suite row"):
        load_hard_rows(["s1_nothing"])


def test_the_full_suite_has_the_seeds_the_issue_asks_for_and_its_time_is_extrapolated_linearly():
    rows = load_hard_rows()
    assert len(FULL.stage1_seeds) >= 5 and len(FULL.stage2_seeds) >= 3
    counts = FULL.runs(rows)
    # 8 stage-1 rows x 5 seeds (s1_full's seeds 0-2 serve the stage-2 rows), 3 tuning fits
    assert counts == {"stage1_fit": 43, "stage1_eval_splits": 8 * 5 * 4 + 3, "stage2_fit": 12, "stage2_eval_splits": 60}
    calibration = {"stage1_fit": (10, 30.0, 30, 50.0), "stage1_eval": (4, 10.0, 16, 22.0), "stage2_fit": (10, 40.0, 30, 80.0), "stage2_eval": (4, 20.0, 16, 44.0)}
    size = replace(FULL, stage1_steps=100, stage2_steps=50, test_images=40)
    estimate = estimate_seconds(calibration, size, rows, jobs=2)
    one_job = estimate["seconds_one_job"]
    assert one_job["stage1_fit"] == pytest.approx(43 * 120.0) and one_job["stage2_fit"] == pytest.approx(12 * 120.0)
    assert one_job["stage1_eval"] == pytest.approx(163 * 46.0) and one_job["stage2_eval"] == pytest.approx(60 * 92.0)
    assert estimate["total_seconds"] == pytest.approx(sum(one_job.values()) / 2)


def test_an_unknown_suite_is_refused():
    with pytest.raises(FineRegionError, match="--suite must be 'easy' or 'hard'"):
        ablations(suite="medium")


@pytest.mark.slow
def test_the_suite_runs_end_to_end_at_toy_size_resumes_and_keeps_the_predictions(tmp_path, capsys):
    out = tmp_path / "results.md"
    out.write_text("# Hard mode\n\n## Predictions (written before the run)\n\n- P1: ...\n\nResults: pending (the suite has not been run yet).\n")
    from fineregion_pl.commands.hard_suite import hard_suite

    size = replace(SMOKE, tune_values=(0.5, 1.0))
    kwargs = dict(rows=["s1_soft", "s1_full", "full"], workdir=str(tmp_path / "suite"), out=str(out), jobs=1, java=False, size=size)
    summary = hard_suite(**kwargs)
    text = out.read_text()
    assert text.startswith("# Hard mode\n\n## Predictions") and "pending" not in text and BEGIN in text and END in text
    assert "### Stage-1 rows" in text and "### Stage-2 rows" in text and "- P1 " in text and "- P3 " in text and "- P4 " in text
    assert "one-anchor vision questions" in text and (tmp_path / "suite" / "full" / "seed0" / "test_gt" / "vision_questions.jsonl").is_file()
    assert (tmp_path / "images" / "hard_accuracy_vs_iou.png").stat().st_size > 5000
    assert set(summary) == {"s1_soft", "s1_full", "full"} and set(summary["full"]) == {"test_gt", "test_det01", "test_det02", "test_loose", "test_ground"}
    assert all(0.0 <= v <= 1.0 for splits in summary.values() for v in splits.values())
    choice = json.loads((tmp_path / "suite" / "recipe.json").read_text())
    assert choice["value"] in (0.5, 1.0) and set(choice["val_region_acc"]) == {"0.5", "1.0"}
    capsys.readouterr()
    hard_suite(**kwargs)  # everything finished: only the report again, the section replaced, not appended
    assert "finished in" not in capsys.readouterr().out
    assert out.read_text().count(BEGIN) == 1
