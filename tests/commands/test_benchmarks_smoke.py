"""The benchmarks run (tiny sizes, ``quick`` mode) and give well-formed rows. No timing is asserted."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import ROW_KEYS  # noqa: E402
from benchmarks import run as runner  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy 2-core machine: keep the smoke test quick
    yield
    torch.set_num_threads(threads)


def test_registry_finds_pooling():
    assert "pooling" in runner.discover()


NEW_BENCHMARKS = {
    # module: (rows it gives, words every figure of it contains)
    "vision": (2, "regions"),
    "stage2_step": (2, "plain loop"),
    "data": (2, "raw webdataset"),
    "generation": (2, "generate"),
    "lm_step": (3, "packed"),
    "evaluation": (1, "batched"),
}


def test_registry_finds_the_new_benchmarks():
    assert set(NEW_BENCHMARKS) <= set(runner.discover())


def assert_well_formed(rows: list[dict], name: str) -> None:
    for r in rows:
        assert set(ROW_KEYS) <= set(r), r
        assert r["name"] == name, r
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r
        assert isinstance(r["met"], bool) and r["target"] and r["figure"] and r["note"], r


@pytest.mark.parametrize("name", sorted(NEW_BENCHMARKS))
def test_new_benchmark_quick_rows_are_well_formed(name, one_thread):
    import importlib

    count, words = NEW_BENCHMARKS[name]
    rows = importlib.import_module(f"benchmarks.bench_{name}").run(quick=True)
    assert len(rows) == count
    assert_well_formed(rows, name)
    assert all(words in r["figure"] for r in rows), [r["figure"] for r in rows]
    for r in rows:  # an unmet target says why in its note
        assert r["met"] or "Unmet" in r["note"], r


def test_plan_prints_every_section(one_thread):
    from benchmarks import plan

    text = plan.plan(plan.ROOT / "configs" / "stage1.yaml", plan.ROOT / "configs" / "stage2.yaml", 0.4, (8, 32))
    for section in ("## The model", "## FLOPs per sample", "## Memory per GPU", "## Memory on one process", "## Throughput and one epoch",
                    "## Stage 1", "## Assumptions"):
        assert section in text
    assert "| 2 | 8 |" in text and "| 3 | 32 |" in text  # ZeRO-2 and ZeRO-3 rows for each GPU count
    assert "3584" in text and "152064" in text  # the hand-written Qwen2.5-7B config is stated
    assert "| `Qwen/Qwen2.5-0.5B-Instruct` |" in text  # the one-process table has the small LM's row
    for term in ("caption_loss", "consistency_loss", "mask_loss", "referring_loss", "spatial_loss"):  # the recipe's terms
        assert f"`{term}`" in text
    assert not re.search(r"\b(nan|inf)\b", text.lower())


def test_plan_step_computes_the_terms_stage2_module_computes(one_thread, tmp_path):
    """plan.stage2_terms makes RegionCaptioner.losses' calls: on a real (tiny, CPU) Stage2Module it gives the same
    loss terms, and plan.weighted_loss weights them as Stage2Module.losses does."""
    from benchmarks import bench_stage2_step, plan

    module, batch, _ = bench_stage2_step.build(tmp_path, quick=True)
    real = module.losses(batch)
    terms = {k: v for k, v in real.items() if k not in ("acc", "loss")}
    torch.testing.assert_close(plan.weighted_loss(module.hparams, terms), real["loss"])
    regions = int(batch["region_valid"].sum())
    layout = plan.Batch(images=batch["images"].shape[0], max_regions=batch["boxes"].shape[1],
                        rows={"caption": regions, "referring": regions, "question": 1}, lengths={}, real_tokens=0, padded_tokens=0)
    ours = plan.stage2_terms(module, batch, layout)
    assert set(ours) == set(terms), (sorted(ours), sorted(terms))
    assert all(torch.isfinite(v) for v in ours.values())


def test_plan_counts_templates_and_batches():
    from benchmarks import plan

    assert plan.template_pieces("Describe the region {region} in a short phrase:") == [3, 5]
    assert plan.template_pieces("{region} and {region}?") == [0, 1, 1]
    s2 = plan.read_config(plan.ROOT / "configs" / "stage2.yaml")
    batch = plan.stage2_batch(s2, plan.DATASETS, [1.0, 1.0])
    assert batch.images == s2["data"]["batch_size"]
    assert batch.rows["caption"] >= batch.rows["referring"] > 0
    assert batch.padded_tokens >= batch.real_tokens > 0


def test_pooling_quick_rows_are_well_formed(one_thread, tmp_path):
    from benchmarks import bench_pooling

    rows = bench_pooling.run(quick=True)
    assert len(rows) >= 7
    for r in rows:
        assert set(ROW_KEYS) <= set(r), r
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
        assert isinstance(r["met"], bool) and r["target"] and r["figure"] and r["note"]
    figures = {r["figure"] for r in rows}
    assert {"speed-up vs torchvision roi_align", "share of the machine's matmul rate (dense-equivalent FLOPs / our time)", "our time / floor",
            "speed-up vs per-region loop (crop)", "prefix-sum / dense time where the rule picks prefix sums (worst level)"} <= figures

    text = runner.report(rows, "python benchmarks/run.py --quick", 1.0)
    assert "| benchmark | figure | value | target | met | note |" in text
    assert text.count("\n| pooling |") + text.count("\n| osprey |") == len(rows)
    assert "nproc" in text and torch.__version__ in text


def test_runner_turns_a_broken_benchmark_into_an_unmet_row(monkeypatch):
    import importlib

    def broken(name):
        raise RuntimeError("no such thing")

    monkeypatch.setattr(importlib, "import_module", broken)
    (r,) = runner.run_module("missing", quick=True)
    assert r["met"] is False and "no such thing" in r["note"] and set(ROW_KEYS) <= set(r)


def test_baselines_agree_with_ours_on_tiny_inputs():
    from benchmarks import bench_pooling

    generator = torch.Generator().manual_seed(0)
    boxes = bench_pooling.random_boxes(generator, 2, 5, 48)
    features = [torch.randn(2, 6, 6, 4, generator=generator), torch.randn(2, 3, 3, 8, generator=generator)]
    z, masks = bench_pooling.ours(features, boxes, (48, 48))
    assert z.shape == (2, 5, 12) and len(masks) == 2
    torch.testing.assert_close(bench_pooling.loop_crop(features, boxes, (48, 48)), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bench_pooling.loop_mask(features, boxes, (48, 48)), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bench_pooling.integrals(features, boxes, (48, 48)), z, atol=1e-5, rtol=1e-5)
    nchw = [f.permute(0, 3, 1, 2).contiguous() for f in features]
    assert bench_pooling.osprey_pool(nchw, boxes, (48, 48)).shape == z.shape
