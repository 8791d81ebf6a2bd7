"""The DataModule under real 2-process DDP (Lightning, CPU, gloo): exact epochs, equal steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fineregion_pl.data.synthetic import SyntheticConfig, write_synthetic

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "ddp_data_probe.py"


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("four-shards")
    manifests = write_synthetic(out, {"train": 96, "test": 40}, seed=3, shard_size=24, config=SyntheticConfig(image_size=64), progress=False)
    assert len(manifests["train"]["shards"]) == 4
    return out, [f"train-{i:06d}" for i in range(96)]


def run_probe(data: Path, out: Path, workers: int, resampled: bool) -> dict[int, dict]:
    out.mkdir()
    done = subprocess.run([sys.executable, str(PROBE), str(data), str(out), str(workers), "1" if resampled else "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.slow
def test_two_ranks_see_every_sample_once_per_epoch(four_shards, tmp_path):
    data, train_ids = four_shards
    seen = run_probe(data, tmp_path / "exact", workers=2, resampled=False)
    steps = [len(seen[r]["train"]) for r in (0, 1)]
    assert steps == [6, 6]  # 96 images / (2 ranks * 8 per batch)
    train = [i for r in (0, 1) for batch in seen[r]["train"] for i in batch]
    assert sorted(train) == train_ids  # none twice, none missed
    test = [i for r in (0, 1) for batch in seen[r]["test"] for i in batch]
    assert sorted(test) == [f"test-{i:06d}" for i in range(40)]
    assert not set(i for b in seen[0]["test"] for i in b) & set(i for b in seen[1]["test"] for i in b)


@pytest.mark.slow
def test_resampled_mode_runs_the_same_number_of_steps_on_both_ranks(four_shards, tmp_path):
    data, train_ids = four_shards
    seen = run_probe(data, tmp_path / "resampled", workers=1, resampled=True)
    assert [len(seen[r]["train"]) for r in (0, 1)] == [6, 6]
    assert all(len(batch) == 8 for r in (0, 1) for batch in seen[r]["train"])
    train = [i for r in (0, 1) for batch in seen[r]["train"] for i in batch]
    assert set(train) <= set(train_ids)
