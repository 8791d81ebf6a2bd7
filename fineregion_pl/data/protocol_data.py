"""A protocol's items as model input: images from a folder, boxes from the annotation file, exactly once over all ranks.

:class:`ProtocolRun` is what ``--data.protocol NAME --data.annotations FILE --data.images DIR``
builds: the protocol, its annotation file (read and checked), the candidates of ``rec`` and
``gt-ranking`` and the scoring options. :class:`ProtocolStream` hands rank ``r`` of ``W`` (and
dataloader worker ``w`` of ``K``) the items ``r * K + w :: W * K`` of the file: each item is read
by exactly one process, none twice (no padding, unlike ``DistributedSampler``), none missed.
It is an iterable dataset, so Lightning neither swaps in a padded sampler nor skips a rank whose
share is empty (that rank still joins the collective that merges the results).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from fineregion_pl.data.annotations import AnnotationFile, file_sha256, ranking_candidates, read_annotations, read_proposals
from fineregion_pl.data.protocols import Protocol, get_protocol
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.transforms import collate_regions, to_region_sample


@dataclass
class ProtocolRun:
    """A protocol, the annotation file it reads, and how its answers are scored.

    Attributes:
        protocol: the protocol.
        annotations: the annotation file, read.
        images: the folder the file's image names are relative to.
        candidates: per item, the candidate boxes of ``rec`` (proposals) and ``gt-ranking`` (annotated boxes).
        proposals: ``{"file", "sha256"}`` of the proposals file, when one was read.
        densecap_map: ``vg-densecap`` also computes DenseCap mAP.
        score_without_java: score without Java (no PTB tokenizer, no METEOR): numbers not comparable.
    """

    protocol: Protocol
    annotations: AnnotationFile
    images: Optional[Path] = None
    candidates: Optional[dict[Any, list[dict]]] = None
    proposals: Optional[dict] = None
    densecap_map: bool = False
    score_without_java: bool = False


def open_protocol_run(
    name: str,
    annotations: Optional[str],
    images: Optional[str] = None,
    proposals: Optional[str] = None,
    densecap_map: bool = False,
    score_without_java: bool = False,
    with_images: bool = True,
) -> ProtocolRun:
    """Read and check everything a protocol needs before any model runs.

    Raises :class:`BadInputError` (one line, naming the file and the record) for a missing or
    wrong annotation or proposals file, a missing image or one whose size is not the annotation's.
    """
    protocol = get_protocol(name)
    if not annotations:
        raise BadInputError(f"protocol {name} needs an annotation file (--data.annotations: {protocol.reads})")
    annotation_file = read_annotations(annotations, protocol, with_images=with_images)
    candidates, proposal_info = None, None
    if protocol.task == "rec" and not proposals and not with_images:
        pass  # scoring a predictions file: the candidates only give the chance level
    elif protocol.task == "rec":
        if not proposals:
            raise BadInputError(f"protocol {name} needs candidate boxes: --data.proposals, a COCO detection-results file of a detector's proposals")
        candidates = read_proposals(proposals, annotation_file)
        proposal_info = {"file": Path(proposals).name, "sha256": file_sha256(proposals)}
    elif protocol.task == "gt-ranking":
        candidates = ranking_candidates(annotation_file)
    elif proposals and protocol.task == "densecap":
        candidates = read_proposals(proposals, annotation_file)
        proposal_info = {"file": Path(proposals).name, "sha256": file_sha256(proposals)}
    elif proposals:
        raise BadInputError(f"protocol {name} captions the annotated boxes; it takes no proposals file")
    run = ProtocolRun(protocol, annotation_file, Path(images) if images else None, candidates, proposal_info, densecap_map, score_without_java)
    if with_images:
        check_images(run)
    return run


def check_images(run: ProtocolRun) -> None:
    """Every image of the file exists in the images folder and has the size the annotation says."""
    if run.images is None:
        raise BadInputError(f"protocol {run.protocol.name} needs the images folder (--data.images) that {run.annotations.path.name}'s file names are relative to")
    if not run.images.is_dir():
        raise BadInputError(f"images folder not found: {run.images}")
    seen: dict[str, tuple[int, int]] = {}
    missing = [item.image for item in run.annotations.items if not (run.images / item.image).is_file()]
    if missing:
        raise BadInputError(f"image {run.images / missing[0]} not found ({len(set(missing))} of the images {run.annotations.path.name} names are missing from {run.images})")
    for item in run.annotations.items:
        if item.image not in seen:
            try:
                with Image.open(run.images / item.image) as probe:
                    seen[item.image] = probe.size
            except (OSError, UnidentifiedImageError) as err:
                raise BadInputError(f"image {run.images / item.image} cannot be read: {str(err).splitlines()[0]}") from None
        if seen[item.image] != (item.width, item.height):
            width, height = seen[item.image]
            raise BadInputError(
                f"image {run.images / item.image} is {width}x{height} but {run.annotations.path.name} gives {item.width}x{item.height} "
                "for it: the boxes are in the original image's pixels (use the original images, not resized copies)"
            )


def item_regions(run: ProtocolRun, index: int) -> list[dict]:
    """The boxes the model sees for item ``index``: its candidates (``rec``, ``gt-ranking``, proposals), else its annotated regions."""
    item = run.annotations.items[index]
    if run.candidates is not None:
        return [{"id": f"c{n}", "box": c["box"]} for n, c in enumerate(run.candidates[item.id])]
    return [{"id": r["id"], "box": r["box"], "captions": r["captions"]} for r in item.regions]


class ProtocolStream(IterableDataset):
    """The items of a :class:`ProtocolRun` for one rank, as :class:`~fineregion_pl.model.transforms.RegionSample` s.

    Args:
        run: the protocol run.
        image_size: side of the letterboxed model input.
        rank, world_size: this process's slot among the evaluating processes.
    """

    def __init__(self, run: ProtocolRun, image_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.run, self.image_size, self.rank, self.world_size = run, image_size, rank, world_size

    def indices(self, worker: int = 0, workers: int = 1) -> list[int]:
        """The item indices this rank's ``worker`` reads."""
        slots = self.world_size * workers
        return list(range(self.rank * workers + worker, len(self.run.annotations.items), slots))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.indices(worker, workers):
            yield self.sample(index)

    def sample(self, index: int) -> tuple[Any, dict]:
        """``(RegionSample, item fields)`` of item ``index``."""
        item = self.run.annotations.items[index]
        regions = item_regions(self.run, index)
        path = self.run.images / item.image
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise BadInputError(f"image {path} cannot be decoded: {str(err).splitlines()[0]}") from None
        record = {"image_id": item.id, "width": item.width, "height": item.height, "regions": regions}
        sample = to_region_sample(image, record, self.image_size, max_regions=max(1, len(regions)), train=False)
        fields = {"id": item.id, "index": index, "expression": item.expression, "target": item.target,
                  "region_ids": [r["id"] for r in regions], "boxes": [r["box"] for r in regions]}
        return sample, fields


def collate_protocol(pairs: list[tuple[Any, dict]]) -> dict[str, Any]:
    """:func:`~fineregion_pl.model.transforms.collate_regions` plus ``protocol_items`` (each item's id, sentence and target box)."""
    batch = collate_regions([sample for sample, _ in pairs])
    batch["protocol_items"] = [fields for _, fields in pairs]
    return batch
