"""The streaming DataModule against the raw limit of reading the same shards.

Ours: ``RegionDataModule(...).train_dataloader()``: per worker its share of the shards, reshuffled,
a shuffle buffer (500 samples, 100 before the first), decode, letterbox + boxes
(``to_region_sample``), images without regions dropped, batches padded by ``collate_regions``,
exactly ``len(stream)`` batches per epoch.

Raw limit: the same shards through plain webdataset in a torch ``DataLoader`` with the same
number of workers: ``SimpleShardList -> split_by_worker -> tarfile_to_samples -> decode("pil")
-> to_tuple -> to_region_sample -> batched(collate_regions)``; no shuffling, no framework.

Both read one epoch (every image once) of synthetic shards written by ``write_synthetic`` (128 px
JPEG scenes, 3-6 shapes, 8 shards of 100 images); batch 16, ``max_regions`` 8 (the quickstart's
stage-2 data settings). The main process only takes the batches. Samples per second are counted
from the first batch to the last (steady state: worker start and the first buffer fill are left
out and reported in the note), one epoch per candidate per round, rounds interleaved.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks import measure_interleaved, median, median_ratio, row  # noqa: E402
from fineregion_pl.data.datamodule import RegionDataModule  # noqa: E402
from fineregion_pl.data.synthetic import write_synthetic  # noqa: E402
from fineregion_pl.model.transforms import collate_regions, to_region_sample  # noqa: E402

TARGET = 0.8


def raw_loader(shards: list[str], batch_size: int, image_size: int, max_regions: int, workers: int) -> DataLoader:
    """Plain webdataset + our per-sample transform and collate in a torch DataLoader."""
    rng = random.Random(0)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.decode("pil"),
        wds.to_tuple("jpg", "json"),
        wds.map(lambda s: to_region_sample(s[0], s[1], image_size, max_regions, True, rng)),
        wds.batched(batch_size, collation_fn=collate_regions, partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers)


class Epoch:
    """One pass over a loader; ``rate`` = images per second from the first batch to the last."""

    def __init__(self, make_loader):
        self.make_loader = make_loader
        self.images = 0
        self.startup: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        first = None
        images = counted = 0
        for batch in self.make_loader():
            now = time.perf_counter()
            n = int(batch["images"].shape[0])
            images += n
            if first is None:
                first = now
                self.startup.append(now - start)
            else:
                counted += n
        end = time.perf_counter()
        self.images = images
        return counted / (end - first)


def run(quick: bool = False) -> list[dict]:
    images, shard_size, batch_size = (64, 16, 8) if quick else (800, 100, 16)
    image_size, max_regions = 128, 8
    rounds = 2 if quick else 11
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        write_synthetic(Path(tmp), {"train": images}, seed=0, shard_size=shard_size, progress=False)
        shards = sorted(str(p) for p in (Path(tmp) / "train").glob("train-*.tar"))
        for workers in (1, 2):
            data = RegionDataModule([tmp], image_size=image_size, batch_size=batch_size, num_workers=workers, max_regions=max_regions)
            ours = Epoch(data.train_dataloader)
            raw = Epoch(lambda w=workers: raw_loader(shards, batch_size, image_size, max_regions, w))
            rates = measure_interleaved({"ours": ours, "raw": raw}, rounds=rounds, warmup=0 if quick else 1)
            ratio = median_ratio(rates["ours"], rates["raw"])
            per_round = [o / r for o, r in zip(rates["ours"], rates["raw"])]
            note = (f"{images} synthetic 128 px images in {len(shards)} shards, batch {batch_size}, max_regions {max_regions}, "
                    f"{workers} worker(s), one epoch each per round, median of {rounds} interleaved rounds: "
                    f"RegionDataModule {median(rates['ours']):.0f} images/s ({ours.images} images per epoch), raw webdataset "
                    f"{median(rates['raw']):.0f} images/s ({raw.images}); until the first batch: {median(ours.startup) * 1e3:.0f} ms "
                    f"vs {median(raw.startup) * 1e3:.0f} ms; per-round ratios {min(per_round):.2f}-{max(per_round):.2f}")
            if ratio < TARGET:
                note += (". Unmet: both read, decode and transform the same images in the same number of workers; what only "
                         "ours runs per sample is the shuffle buffer, the region filter and the epoch bookkeeping; with "
                         f"{workers} worker(s) + the main process on {os.cpu_count()} shared cores, compare the per-round spread")
            rows.append(row("data", f"samples/s, RegionDataModule / raw webdataset, {workers} worker(s)", ratio, f">= {TARGET}x", ratio >= TARGET, note))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
