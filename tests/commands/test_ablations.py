"""``fineregion-pl ablations``: runs side by side, stage 1 shared between rows, tables over seeds, resumable."""

from __future__ import annotations

import json

import pytest

from fineregion_pl.commands.ablations import ablations
from fineregion_pl.commands.run_queue import Run, run_all
from fineregion_pl.model.errors import FineRegionError


@pytest.mark.slow
def test_two_rows_two_seeds_side_by_side_make_both_tables(tmp_path, capsys):
    workdir, out = tmp_path / "ablations", tmp_path / "results.md"
    kwargs = dict(rows=["full", "static_prompts"], seeds=[0, 1], workdir=str(workdir), out=str(out), train_images=24,
                  val_images=4, test_images=6, stage1_steps=2, stage2_steps=2, lm_steps=5, jobs=2)
    summary = ablations(**kwargs)
    # full and static_prompts have the same stage-1 overlay: one stage 1 per seed
    stage1 = sorted(p.name for p in (workdir / "stage1").iterdir())
    assert [name.rsplit("-", 1)[1] for name in stage1] == ["seed0", "seed1"]
    for row in ("full", "static_prompts"):
        for seed in (0, 1):
            results = json.loads((workdir / row / f"seed{seed}" / "results.json").read_text())
            assert 0.0 <= results["classification"]["accuracy"] <= 1.0
            assert (workdir / row / f"seed{seed}" / "log.txt").read_text().count("$ fineregion-pl ") == 2  # fit, test
        accuracy = summary[row]["classification/accuracy"]
        assert accuracy[2] == 2  # two seeds
    text = out.read_text()
    assert "## Table 1. Methods" in text and "## Table 2. Ablations" in text
    assert text.count("(n=2)") == 3  # full in both tables, static prompts in table 2
    first = capsys.readouterr().out
    assert "[6/6]" in first  # 2 stage-1 runs + 4 row runs
    ablations(**kwargs)  # everything finished: only the tables again
    assert "finished in" not in capsys.readouterr().out


def test_a_failing_run_stops_the_queue_naming_the_run_and_its_log(tmp_path):
    bad = Run("stage1 broken", [["fit", "--config", str(tmp_path / "missing.yaml")]], tmp_path / "done", tmp_path / "log.txt")
    later = Run("row after broken", [["fit", "--help"]], tmp_path / "later", tmp_path / "later.txt", after="stage1 broken")
    with pytest.raises(FineRegionError, match=r"run stage1 broken failed .*log: .*log\.txt"):
        run_all([bad, later], jobs=2)
    assert "missing.yaml" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "done").exists() and not (tmp_path / "later.txt").exists()


def test_a_run_waiting_for_an_unknown_run_is_refused(tmp_path):
    orphan = Run("row", [["fit", "--help"]], tmp_path / "done", tmp_path / "log.txt", after="stage1 nowhere")
    with pytest.raises(FineRegionError, match="unknown run"):
        run_all([orphan], jobs=2)
