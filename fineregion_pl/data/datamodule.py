"""Streaming region data: webdataset shards to padded region batches, one sample per image.

The pipeline, top to bottom (one place, as in open_clip's ``data.py``):

    shard list of each shard set
      -> this rank's and this worker's shards   (rank and world size given by the Trainer)
      -> [train] reshuffled every pass, repeated (or resampled with replacement)
      -> tar samples -> [train] shuffle buffer -> decode -> letterbox + boxes -> max_regions
      -> [train, several sets] seeded weighted mix
      -> batches (collate pads regions)
      -> [train] exactly ``len(stream)`` batches per epoch on every rank

Training runs the same number of steps on every rank (``batches per epoch = images in the
manifests // (world size * batch size)``), so DDP never waits on a rank that ran out of data.
Evaluation reads every shard exactly once over all ranks and workers: no sample is seen twice
and none is missed. Rank and world size come from the Trainer, not from environment variables
that a spawned worker may not see.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fineregion_pl.data.annotations import file_sha256
from fineregion_pl.data.image_folder import BadInputError, ImageBoxesDataset, collate_user_regions
from fineregion_pl.data.protocol_data import ProtocolRun, ProtocolStream, collate_protocol, open_protocol_run
from fineregion_pl.data.protocols import ProtocolName
from fineregion_pl.data.shards import read_manifest, split_shards
from fineregion_pl.lightning_private import batches_read_this_epoch
from fineregion_pl.model.schemas import check_options
from fineregion_pl.model.transforms import collate_regions, to_region_sample

# Lightning warns about any IterableDataset with a length and several workers; this stream splits
# its shards by worker and gives each worker its share of len(), so the length is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def skip_bad_sample(error: Exception) -> bool:
    """webdataset error handler: skip the sample, with one warning naming it and its shard."""
    if isinstance(error, BadInputError):  # ours: the message already names the sample, its shard and the field
        warnings.warn(f"skipped {error}", stacklevel=2)
        return True
    key, url = getattr(error, "key", None), getattr(error, "url", None)
    cause = error.__cause__ or error.__context__ or error
    where = f"sample {key!r} of {url}" if key or url else "a sample"
    warnings.warn(f"skipped {where}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'cannot decode'}", stacklevel=2)
    return True


def _decoded_sample(sample: dict) -> dict:
    """A tar sample with its JSON record checked (:class:`~fineregion_pl.data.schemas.ShardRecord`:
    a wrong-typed box or category is a skip naming the sample and field, not a crash downstream)
    and parsed, and its image read by :func:`~fineregion_pl.model.images.as_rgb`, as at every front door."""
    import json

    from fineregion_pl.data.schemas import check_record
    from fineregion_pl.model.images import as_rgb

    where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"
    try:
        record = json.loads(sample["json"])
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise BadInputError(f"{where}: no readable JSON record ({err})") from None
    check_record(record, where)
    out = {**sample, "json": record}
    for ext in ("jpg", "jpeg", "png"):
        if ext in out:
            out[ext] = as_rgb(out[ext], where)
    return out


def _samples(shards: list[str], stream: RegionBatchStream, rng: random.Random, category_map: Optional[list[int]] = None) -> Iterator:
    """Decoded region samples of ``shards`` in order (with a shuffle buffer when training).

    When training, images without a usable region are dropped (there is nothing to learn from).
    """
    if not shards:
        return iter(())
    stages = [wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=skip_bad_sample)]
    if stream.train:
        stages.append(wds.shuffle(stream.shuffle_buffer, initial=min(100, stream.shuffle_buffer), rng=rng))
    stages += [
        wds.map(_decoded_sample, handler=skip_bad_sample),
        wds.to_tuple("jpg;png;jpeg", "json", handler=skip_bad_sample),
        wds.map(lambda s: to_region_sample(s[0], s[1], stream.image_size, stream.max_regions, stream.train, rng, category_map)),
    ]
    if stream.train:
        stages.append(wds.select(lambda sample: len(sample.region_ids) > 0))
    return iter(wds.DataPipeline(*stages))


def _forever(shards: list[str], stream: RegionBatchStream, rng: random.Random, category_map: Optional[list[int]] = None) -> Iterator:
    """Training samples of ``shards`` without end: reshuffled every pass, or resampled with replacement."""
    while True:
        if stream.resampled:
            order = rng.choices(shards, k=len(shards))
        else:
            order = list(shards)
            rng.shuffle(order)
        yield from _samples(order, stream, rng, category_map)


class RegionBatchStream(IterableDataset):
    """Batches of region samples from one or more shard sets, split by rank and dataloader worker.

    Args:
        shard_sets: per shard set, its shard paths.
        batch_size: images per batch.
        image_size: side of the letterboxed model input.
        max_regions: regions kept per image.
        train: training mode (see the module docstring); otherwise one exact pass.
        rank, world_size: this process's slot among the data-parallel processes.
        seed: base seed of every shuffle and mix.
        shuffle_buffer: sample shuffle buffer when training.
        weights: sampling weight of each shard set when training (default: by image count).
        images_per_epoch: images in one training epoch (sets the epoch length).
        resampled: draw shards with replacement when training (multi-node, many ranks).
        category_maps: per shard set, its ``category_id`` -> joint category index.
    """

    def __init__(
        self,
        shard_sets: list[list[str]],
        batch_size: int,
        image_size: int,
        max_regions: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 500,
        weights: Optional[list[float]] = None,
        images_per_epoch: int = 0,
        resampled: bool = False,
        category_maps: Optional[list[Optional[list[int]]]] = None,
    ):
        super().__init__()
        self.category_maps = category_maps or [None] * len(shard_sets)
        self.shard_sets = [list(s) for s in shard_sets]
        self.batch_size, self.image_size, self.max_regions, self.train = batch_size, image_size, max_regions, train
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.weights = weights or [float(len(s)) for s in self.shard_sets]
        self.images_per_epoch, self.resampled = images_per_epoch, resampled
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (training); an exact pass has no fixed length per rank."""
        if not self.train:
            raise TypeError("an evaluation stream has no fixed length per rank")
        return max(1, self.images_per_epoch // (self.world_size * self.batch_size))

    def _my_share(self, shards: list[str], worker: int, workers: int) -> list[str]:
        slot, slots = self.rank * workers + worker, self.world_size * workers
        if self.train and len(shards) < slots:  # too few shards: every slot reads all, differently shuffled
            return list(shards)
        return shards[slot::slots]

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker_slot()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        if not self.train:
            parts = [_samples(self._my_share(shards, worker, workers), self, rng, cmap) for shards, cmap in zip(self.shard_sets, self.category_maps)]
            yield from _batches(itertools.chain(*parts), self.batch_size)
            return
        epoch_order = random.Random(f"{self.seed}/{self.epoch}")  # the same on every rank: a common permutation
        sources, weights = [], []
        for shards, weight, cmap in zip(self.shard_sets, self.weights, self.category_maps):
            shards = list(shards)
            epoch_order.shuffle(shards)
            mine = self._my_share(shards, worker, workers)
            if mine:
                sources.append(_forever(mine, self, rng, cmap))
                weights.append(weight)
        total = len(self)
        count = total // workers + (1 if worker < total % workers else 0)
        mixed = _mix(sources, weights, rng)
        for _, batch in zip(range(count), _batches(mixed, self.batch_size)):
            yield batch


def _mix(sources: list[Iterator], weights: list[float], rng: random.Random) -> Iterator:
    """Seeded weighted interleaving of endless sample iterators."""
    if len(sources) == 1:
        yield from sources[0]
        return
    while True:
        yield next(sources[rng.choices(range(len(sources)), weights=weights)[0]])


def _batches(samples: Iterator, batch_size: int) -> Iterator[dict]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate_regions(batch)
            batch = []
    if batch:
        yield collate_regions(batch)


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its stream the current epoch each time an epoch starts, and skips
    the batches of the epoch that are already done when a run resumes mid-epoch.

    Lightning calls ``set_epoch`` only on samplers, and an iterable stream has none; workers are
    forked when iteration starts, so setting the epoch here reaches them. ``progress`` gives
    ``(epoch, batches already done in it)`` from the Trainer's own (checkpointed) progress, so a
    resumed run reads exactly the batches the interrupted one had not read yet (the skipped ones
    are decoded and dropped: resuming late in a long epoch costs that reading time).
    """

    def __init__(self, *args, progress=lambda: (0, 0), **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def __iter__(self):
        epoch, done = self.progress()
        self.dataset.set_epoch(epoch)
        batches = super().__iter__()
        if self.dataset.train and done:
            return itertools.islice(batches, done, None)
        return batches


class RegionDataModule(L.LightningDataModule):
    """Train/val/test/predict loaders over shard sets written by the converters or the synthetic benchmark.

    Args:
        data_dirs: shard-set roots, each holding ``<split>/manifest.json`` and its shards.
        weights: training sampling weight of each shard set (default: proportional to images).
        image_size: side of the square letterboxed model input in pixels.
        batch_size: images per training batch (every region of an image comes along).
        eval_batch_size: images per evaluation batch (default: ``batch_size``).
        num_workers: dataloader worker processes.
        max_regions: regions kept per image.
        shuffle_buffer: sample shuffle buffer when training.
        seed: seed of shard and sample shuffles.
        resampled: draw training shards with replacement (for many ranks and nodes).
        train_split, val_split, test_split, predict_split: split folder names.
        predict_images: a folder of images to predict on (with ``predict_boxes``) instead of a split.
        predict_boxes: JSON/JSONL boxes per image of ``predict_images``, or a detector's COCO results
            file (see ``data/image_folder.py``).
        predict_score_threshold: COCO results: detections scoring below it are not described.
        predict_top_k: COCO results: at most this many detections per image (the best scores).
        protocol: ``test`` on a published evaluation protocol instead of the shards' test split
            (``refcocog-regcap``, ``vg-regcap``, ``vg-densecap``, ``refcocog-rec``, ``gt-ranking``;
            see ``fineregion_pl/data/protocols.py`` and ``docs/evaluation.md``).
        annotations: the protocol's annotation file, as distributed.
        images: the folder its image file names are relative to (the original images).
        proposals: ``refcocog-rec``: a COCO detection-results file of candidate boxes
            (``vg-densecap``: boxes to caption instead of the annotated ones).
        densecap_map: ``vg-densecap`` also computes DenseCap mAP (needs Java for METEOR).
        score_without_java: score captions without Java (no PTB tokenizer, no METEOR); the results
            card labels such numbers as not comparable with published ones.
        predict_max_regions: most boxes one image of ``predict_boxes`` may have (default 1000); an
            image with more is an error naming it, never a silent cut.
    """

    def __init__(
        self,
        data_dirs: list[str] = ["runs/quickstart/data"],
        weights: Optional[list[float]] = None,
        image_size: int = 128,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 1,
        max_regions: int = 32,
        shuffle_buffer: int = 500,
        seed: int = 0,
        resampled: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        predict_split: str = "test",
        predict_images: Optional[str] = None,
        predict_boxes: Optional[str] = None,
        predict_score_threshold: float = 0.0,
        predict_top_k: Optional[int] = None,
        protocol: Optional[ProtocolName] = None,
        annotations: Optional[str] = None,
        images: Optional[str] = None,
        proposals: Optional[str] = None,
        densecap_map: bool = False,
        score_without_java: bool = False,
        predict_max_regions: int = 1000,
    ):
        super().__init__()
        check_options("data", batch_size=(batch_size, ">=1"), eval_batch_size=(eval_batch_size, ">=1"), num_workers=(num_workers, ">=0"),
                      max_regions=(max_regions, ">=1"), predict_max_regions=(predict_max_regions, ">=1"), shuffle_buffer=(shuffle_buffer, ">=1"), image_size=(image_size, ">=1"))
        self.save_hyperparameters()
        self.data_dirs = [str(d) for d in data_dirs]
        self.protocol_run: Optional[ProtocolRun] = None
        if weights is not None and len(weights) != len(self.data_dirs):
            raise BadInputError(
                f"data.weights has {len(weights)} entries for {len(self.data_dirs)} data_dirs {list(self.data_dirs)}: give one weight per "
                f"shard set (--data.weights '[{', '.join(['1.0'] * len(self.data_dirs))}]') or --data.weights null (weights by image count)"
            )

    def manifests(self, split: str) -> list[dict]:
        """The manifest of ``split`` in every shard set."""
        return [read_manifest(Path(d) / split) for d in self.data_dirs]

    @property
    def categories(self) -> list[str]:
        """The joint category list of all shard sets: the first set's names in order, then each
        later set's new names (a name shared by two sets is one category)."""
        return joint_categories([m.get("categories", []) for m in self._category_manifests()])[0]

    def has_manifests(self) -> bool:
        """Whether any shard set has a split manifest (there are none when predicting on an image folder)."""
        splits = (self.hparams.train_split, self.hparams.val_split, self.hparams.test_split, self.hparams.predict_split)
        return any((Path(d) / s / "manifest.json").is_file() for d in self.data_dirs for s in splits)

    def _category_manifests(self) -> list[dict]:
        """One manifest per shard set to read categories from (the first split that exists)."""
        out = []
        for d in self.data_dirs:
            for split in (self.hparams.train_split, self.hparams.val_split, self.hparams.test_split, self.hparams.predict_split):
                if (Path(d) / split / "manifest.json").is_file():
                    out.append(read_manifest(Path(d) / split))
                    break
            else:
                out.append(read_manifest(Path(d) / self.hparams.train_split))  # raises the clear error
        return out

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _progress(self) -> tuple[int, int]:
        """``(epoch, training batches already done in it)`` from the Trainer (0, 0 without one)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        done = batches_read_this_epoch(trainer)
        return trainer.current_epoch, int(done)

    def stream(self, split: str, train: bool) -> RegionBatchStream:
        """The batch stream of ``split`` for this process."""
        manifests = self.manifests(split)
        shard_sets = [split_shards(Path(d), split, m) for d, m in zip(self.data_dirs, manifests)]
        if not any(shard_sets):
            raise ValueError(f"the {split!r} split has no shards in {self.data_dirs} (its manifests list none; see their 'skipped' counts)")
        keep = [i for i, s in enumerate(shard_sets) if s]
        weights = [self.hparams.weights[i] for i in keep] if self.hparams.weights else [float(manifests[i]["num_images"]) for i in keep]
        _, maps = joint_categories([m.get("categories", []) for m in self._category_manifests()])
        rank, world = self._rank()
        batch_size = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        return RegionBatchStream(
            [shard_sets[i] for i in keep], batch_size, self.hparams.image_size, self.hparams.max_regions, train,
            rank, world, self.hparams.seed, self.hparams.shuffle_buffer, weights,
            images_per_epoch=sum(int(m["num_images"]) for m in manifests), resampled=self.hparams.resampled,
            category_maps=[maps[i] for i in keep],
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        stream = self.stream(split, train)
        shards = sum(len(s) for s in stream.shard_sets)
        workers = self.hparams.num_workers if train else min(self.hparams.num_workers, max(1, shards // stream.world_size))
        return EpochDataLoader(stream, batch_size=None, num_workers=workers, progress=self._progress)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.hparams.protocol:
            return self._protocol_loader()
        return self._loader(self.hparams.test_split, train=False)

    def open_protocol(self) -> ProtocolRun:
        """The protocol run of ``data.protocol`` (read and checked once: files, images, sizes)."""
        if self.protocol_run is None:
            hp = self.hparams
            self.protocol_run = open_protocol_run(hp.protocol, hp.annotations, hp.images, hp.proposals, hp.densecap_map, hp.score_without_java)
        return self.protocol_run

    def _protocol_loader(self) -> DataLoader:
        rank, world = self._rank()
        stream = ProtocolStream(self.open_protocol(), self.hparams.image_size, rank, world)
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        workers = min(self.hparams.num_workers, len(stream.indices()))
        return DataLoader(stream, batch_size=batch_size, collate_fn=collate_protocol, num_workers=workers)

    def test_source(self) -> dict:
        """What the shards' test split is, for the results card: the manifests, their SHA-256 and region counts."""
        split = self.hparams.test_split
        files = [Path(d) / split / "manifest.json" for d in self.data_dirs]
        manifests = [read_manifest(f.parent) for f in files]
        synthetic = all(m.get("source") == "synthetic" for m in manifests)
        return {
            "protocol": "synthetic" if synthetic else "shards",
            "files": [{"file": str(f), "sha256": file_sha256(f), "source": m.get("source")} for f, m in zip(files, manifests)],
            "expected_regions": sum(int(m.get("num_regions", 0)) for m in manifests),
            "max_regions": self.hparams.max_regions,
        }

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_boxes or self.hparams.predict_images:
            if not (self.hparams.predict_boxes and self.hparams.predict_images):
                raise BadInputError("give both data.predict_images (a folder) and data.predict_boxes (a JSON/JSONL file)")
            dataset = ImageBoxesDataset(self.hparams.predict_images, self.hparams.predict_boxes, self.hparams.image_size, self.hparams.predict_max_regions,
                                        score_threshold=self.hparams.predict_score_threshold, top_k=self.hparams.predict_top_k)
            batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
            return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_user_regions, num_workers=self.hparams.num_workers)
        return self._loader(self.hparams.predict_split, train=False)


def joint_categories(lists: list[list[str]]) -> tuple[list[str], list[list[int]]]:
    """Merge category lists: the joint list and, per input list, each local index's joint index."""
    joint: list[str] = []
    index: dict[str, int] = {}
    maps = []
    for names in lists:
        local = []
        for name in names:
            if name not in index:
                index[name] = len(joint)
                joint.append(name)
            local.append(index[name])
        maps.append(local)
    return joint, maps
