"""The schemas of the files the package reads, one per boundary (pydantic, strict: see
:mod:`fineregion_pl.model.schemas`): shard-set manifests, shard records, predict's boxes files and
the converters' inputs (refer pickles and ``instances.json``, Visual Genome's JSON files).

A file of the wrong shape, or a record with a field of the wrong type, is a one-line
:class:`~fineregion_pl.model.errors.BadInputError` naming the file, the record and the field.
Box *values* are not judged here: the converters count a bad box as a skip, predict refuses it
(:func:`fineregion_pl.model.boxes.check_box`), both naming the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional, Union

from pydantic import Field, TypeAdapter, ValidationError

from fineregion_pl.data.json_files import read_json_file
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.schemas import Box4, RegionId, Strict, problem, validated

Count = Annotated[int, Field(ge=0)]
Side = Annotated[int, Field(ge=1)]
ImageId = RegionId


# ----------------------------------------------------------------------------- shard sets
class Manifest(Strict):
    """``<split>/manifest.json`` of a shard set (see :mod:`fineregion_pl.data.shards`)."""

    split: str
    num_images: Count
    num_regions: Optional[Count] = None
    num_sentences: Optional[Count] = None
    num_questions: Optional[Count] = None
    categories: list[str] = []
    shards: list[str]
    skipped: dict[str, Count] = {}
    skipped_images: dict[str, Count] = {}
    skipped_sentences: dict[str, Count] = {}
    skipped_questions: dict[str, Count] = {}


class ShardQuestion(Strict):
    regions: Annotated[list[RegionId], Field(min_length=2, max_length=2)]
    question: str
    answer: str


class ShardRegion(Strict):
    id: RegionId
    box: Box4
    captions: list[str] = []
    referring: list[str] = []
    category: Optional[str] = None
    category_id: Optional[Annotated[int, Field(ge=-1)]] = None
    segmentation: Any = None


class ShardRecord(Strict):
    """The JSON record of one shard sample: an image and its regions."""

    image_id: ImageId
    width: Optional[Side] = None
    height: Optional[Side] = None
    regions: list[ShardRegion] = []
    questions: list[ShardQuestion] = []


def read_manifest_file(path: str | Path) -> dict:
    """A validated manifest as a plain dict (unknown fields kept)."""
    data = read_json_file(path, "shard manifest")
    return validated(Manifest, data, str(path)).model_dump()


def check_record(record: Any, where: str) -> ShardRecord:
    """A validated shard record; ``where`` names the sample and its shard."""
    return validated(ShardRecord, record, where)


# ----------------------------------------------------------------------------- predict's boxes files
class BoxesEntry(Strict):
    """One image of a boxes file: ``{"image": "a.jpg", "boxes": [[x0, y0, x1, y1], ...], "ids": [...], "masks": [...]}``
    (``masks``: a COCO RLE or polygons per box, or null for none)."""

    image: str
    boxes: list[Any] = []
    ids: Optional[list[RegionId]] = None
    masks: Optional[list[Any]] = None


def boxes_entries(data: Any, path: Path) -> list[BoxesEntry]:
    """The entries of a parsed boxes file (an object ``{image: boxes}`` or a list of entries),
    each validated; an image named twice is an error (its boxes would otherwise be merged or lost)."""
    if isinstance(data, dict):
        data = [{"image": name, "boxes": boxes} for name, boxes in data.items()]
    if not isinstance(data, list):
        raise BadInputError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
    entries, seen = [], {}
    for number, raw in enumerate(data, 1):
        entry = validated(BoxesEntry, raw, f"{path}: entry {number}")
        if entry.image in seen:
            raise BadInputError(f"{path}: image {entry.image!r} appears twice (entries {seen[entry.image]} and {number}); give each image once")
        seen[entry.image] = number
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- refer toolkit (RefCOCO/+/g)
class ReferSentence(Strict):
    sent: Optional[str] = None
    raw: Optional[str] = None
    sent_id: Optional[RegionId] = None


class ReferRef(Strict):
    ref_id: Optional[RegionId] = None
    image_id: ImageId
    ann_id: ImageId
    split: str
    category_id: Optional[int] = None
    file_name: Optional[str] = None
    sentences: list[ReferSentence] = []


class CocoImage(Strict):
    id: ImageId
    file_name: Optional[str] = None
    width: Optional[Side] = None
    height: Optional[Side] = None


class CocoAnnotation(Strict):
    id: ImageId
    image_id: Optional[ImageId] = None
    bbox: Any = None  # judged per record by the converter (a counted skip)
    category_id: Optional[int] = None
    segmentation: Any = None


class CocoCategory(Strict):
    id: int
    name: str


class Instances(Strict):
    """``instances.json`` of the refer toolkit (COCO's layout)."""

    images: list[CocoImage] = []
    annotations: list[CocoAnnotation] = []
    categories: list[CocoCategory] = []


def check_list(model: Any, data: Any, where: str, unit: str = "entry") -> list:
    """``data`` itself once every item passed ``model``; else one line naming the first bad ``unit`` and field."""
    if not isinstance(data, list):
        raise BadInputError(f"{where}: expected a list (one {unit} per item), found {type(data).__name__}")
    adapter = TypeAdapter(list[model])
    try:
        adapter.validate_python(data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        index, *rest = first["loc"]
        raise BadInputError(f"{where}: {unit} {index}: {problem(dict(first, loc=tuple(rest)))}") from None
    return data


def check_split_file(data: Any, where: str) -> dict[str, list]:
    """A split file ``{"train": [image ids], ...}`` (ids integers or strings), or one line naming the split and field."""
    if not isinstance(data, dict):
        raise BadInputError(f'{where}: expected {{"train": [image ids], "val": [...], "test": [...]}}, found {type(data).__name__}')
    for split, ids in data.items():
        check_list(ImageIdItem, [{"id": i} for i in ids] if isinstance(ids, list) else ids, f"{where}: split {split!r}", "image id")
    return data


# ----------------------------------------------------------------------------- Visual Genome
class VgImageRef(Strict):
    """An image named by a dict (VG 1.0's ``"image": {"id": ...}``)."""

    image_id: Optional[ImageId] = None
    id: Optional[ImageId] = None


VgImageId = Optional[Union[VgImageRef, ImageId]]


class VgEntry(Strict):
    """A per-image entry of any VG file: its image named by ``image_id``, ``id`` or ``image``."""

    image_id: VgImageId = None
    id: VgImageId = None
    image: VgImageId = None


class VgImage(Strict):
    image_id: Optional[ImageId] = None
    id: Optional[ImageId] = None
    url: Optional[str] = None
    width: Optional[Side] = None
    height: Optional[Side] = None


class VgRegion(Strict):
    region_id: Optional[RegionId] = None
    id: Optional[RegionId] = None
    image_id: VgImageId = None
    image: VgImageId = None
    phrase: Optional[str] = None


class VgRegionEntry(VgEntry):
    regions: list[VgRegion] = []


class VgObject(Strict):
    names: Optional[list[str]] = None
    name: Optional[str] = None


class VgObjectEntry(VgEntry):
    objects: list[VgObject] = []


class VgEnd(Strict):
    names: Optional[list[str]] = None
    name: Optional[str] = None


class VgRelationship(Strict):
    predicate: Optional[str] = None
    subject: Optional[VgEnd] = None
    object: Optional[VgEnd] = None


class VgRelationshipEntry(VgEntry):
    relationships: list[VgRelationship] = []


class ImageIdItem(Strict):
    id: ImageId
