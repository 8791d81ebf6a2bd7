"""Streaming region data: webdataset shards to padded region batches, one sample per image."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import read_manifest, split_shards
from .transforms import collate_regions, to_region_sample


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class RegionShardStream(IterableDataset):
    """Samples of one or more shard sets, split by rank and by dataloader worker.

    The rank and world size are given explicitly (from the Trainer), so splitting does not
    depend on environment variables a spawned worker may not see.

    Args:
        shards: shard paths.
        image_size: side of the letterboxed model input.
        max_regions: regions kept per image.
        train: shuffle shards (per epoch) and samples (buffer), random region subsets and captions.
        rank, world_size: this process's slot among the data-parallel processes.
        seed: base seed of every shuffle.
        shuffle_buffer: size of the sample shuffle buffer when training.
    """

    def __init__(self, shards: list[str], image_size: int, max_regions: int, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 500):
        super().__init__()
        self.shards, self.image_size, self.max_regions, self.train = list(shards), image_size, max_regions, train
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[str]:
        """The shards this rank and worker read this epoch (a seeded permutation when training)."""
        shards = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        worker, workers = _worker_slot()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        return shards[slot::slots]

    def __iter__(self) -> Iterator:
        worker, _ = _worker_slot()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        pipeline = [
            wds.SimpleShardList(self.my_shards()),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
        ]
        if self.train:
            pipeline.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        pipeline += [
            wds.decode("pil", handler=wds.warn_and_continue),
            wds.to_tuple("jpg;png;jpeg", "json", handler=wds.warn_and_continue),
            wds.map(lambda s: to_region_sample(s[0], s[1], self.image_size, self.max_regions, self.train, rng)),
        ]
        return iter(wds.DataPipeline(*pipeline))


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its stream the current epoch each time an epoch starts.

    Lightning calls ``set_epoch`` only on samplers, and an iterable stream has none; workers are
    forked when iteration starts, so setting the epoch here reaches them.
    """

    def __init__(self, *args, epoch_source=lambda: 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_source = epoch_source

    def __iter__(self):
        self.dataset.set_epoch(self.epoch_source())
        return super().__iter__()


class RegionDataModule(L.LightningDataModule):
    """Train/val/test/predict loaders over shard sets written by the converters or the synthetic benchmark.

    Args:
        data_dirs: shard-set roots, each holding ``<split>/manifest.json`` and its shards.
        image_size: side of the square letterboxed model input in pixels.
        batch_size: images per training batch (every region of an image comes along).
        eval_batch_size: images per evaluation batch (default: ``batch_size``).
        num_workers: dataloader worker processes.
        max_regions: regions kept per image.
        shuffle_buffer: sample shuffle buffer when training.
        seed: seed of shard and sample shuffles.
        train_split, val_split, test_split: split folder names.
    """

    def __init__(
        self,
        data_dirs: list[str] = ["runs/quickstart/data"],
        image_size: int = 128,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 1,
        max_regions: int = 32,
        shuffle_buffer: int = 500,
        seed: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.data_dirs = [str(d) for d in data_dirs]

    def manifests(self, split: str) -> list[dict]:
        """The manifest of ``split`` in every shard set."""
        return [read_manifest(Path(d) / split) for d in self.data_dirs]

    @property
    def categories(self) -> list[str]:
        """Category names of the first shard set (index = ``category_id``)."""
        return self.manifests(self.hparams.train_split)[0].get("categories", [])

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, train: bool) -> DataLoader:
        shards = [s for d in self.data_dirs for s in split_shards(Path(d), split)]
        rank, world = self._rank()
        stream = RegionShardStream(shards, self.hparams.image_size, self.hparams.max_regions, train, rank, world, self.hparams.seed, self.hparams.shuffle_buffer)
        batch_size = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        workers = min(self.hparams.num_workers, max(1, len(shards) // world))
        return EpochDataLoader(stream, batch_size=batch_size, collate_fn=collate_regions, num_workers=workers, epoch_source=self._current_epoch)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_split, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_split, train=False)
