"""The images of a study's regions, from a folder of image files or from webdataset shards.

- a folder of images (what ``fineregion-pl predict --data.predict_images DIR`` read): a
  prediction's ``image_id`` is the file's path relative to the folder;
- a shard set (what ``test``/``predict`` read without ``--data.predict_*``): a folder with
  ``SPLIT/manifest.json`` (e.g. ``runs/quickstart/data``) or one split folder; a prediction's
  ``image_id`` is the record's ``image_id``, and the record gives each region's ``source`` and
  true ``category``.

The bytes are copied into the study as they are, so the study file is all a rating server needs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from fineregion_pl.data.shards import MANIFEST, read_manifest, split_shards
from fineregion_pl.model.errors import BadInputError

IMAGE_KEYS = ("jpg", "jpeg", "png")
MAX_PIXELS = 100_000_000


def _size(data: bytes, where: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise BadInputError(f"{where} is {image.width}x{image.height} pixels (at most {MAX_PIXELS:,})")
            image.verify()
            return image.width, image.height
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadInputError(f"{where} is not a readable image ({type(err).__name__}: {err})") from None


def shard_split_dirs(root: Path) -> list[Path]:
    """The split folders of a shard set (``root`` itself when it is one)."""
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))


def images_from_shards(root: Path, wanted: Iterable[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(images, records)`` by image id: ``{"image_id", "width", "height", "data"}`` and the shard record."""
    import webdataset as wds

    from fineregion_pl.data.datamodule import skip_bad_sample

    wanted = set(wanted)
    images: dict[str, dict] = {}
    records: dict[str, dict] = {}
    for split_dir in shard_split_dirs(root):
        pipeline = wds.DataPipeline(wds.SimpleShardList(split_shards(split_dir.parent, split_dir.name, read_manifest(split_dir))), wds.tarfile_to_samples(handler=skip_bad_sample))
        for sample in pipeline:
            if "json" not in sample:
                continue
            record = json.loads(sample["json"])
            image_id = str(record.get("image_id", sample["__key__"]))
            if image_id not in wanted or image_id in images:
                continue
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                continue
            width, height = _size(sample[key], f"image {image_id!r} in {sample.get('__url__', split_dir)}")
            images[image_id] = {"image_id": image_id, "width": width, "height": height, "data": sample[key]}
            records[image_id] = record
            if len(images) == len(wanted):
                return images, records
    return images, records


def images_from_folder(root: Path, wanted: Iterable[str]) -> dict[str, dict]:
    """``{"image_id", "width", "height", "data"}`` by image id, read from ``root/<image_id>``."""
    images = {}
    for image_id in wanted:
        path = root / image_id
        if not path.resolve().is_relative_to(root.resolve()):
            raise BadInputError(f"image id {image_id!r} points outside the image folder {root}")
        if not path.is_file():
            continue
        data = path.read_bytes()
        width, height = _size(data, str(path))
        images[image_id] = {"image_id": image_id, "width": width, "height": height, "data": data}
    return images


def find_images(root: str | Path, wanted: Iterable[str]) -> tuple[dict[str, dict], dict[str, dict], str]:
    """``(images, shard records, kind)`` for the wanted image ids from a folder or a shard set.

    A wanted image that cannot be found is an error naming it and where it was looked for.
    """
    root = Path(root)
    wanted = sorted(set(map(str, wanted)))
    if not root.is_dir():
        raise BadInputError(f"image folder or shard set not found: {root}")
    records: dict[str, dict] = {}
    if shard_split_dirs(root):
        images, records = images_from_shards(root, wanted)
        kind = "shards"
    else:
        images, kind = images_from_folder(root, wanted), "folder"
    missing = [i for i in wanted if i not in images]
    if missing:
        where = "in the shards of" if kind == "shards" else "in the folder"
        raise BadInputError(f"{len(missing)} image(s) of the predictions are not {where} {root}, e.g. {missing[0]!r}: give the images the predictions were made on")
    return images, records, kind


def region_facts(record: Optional[dict], region_id) -> tuple[Optional[str], Optional[str]]:
    """``(source, true category)`` of a region from its shard record (``(None, None)`` without one)."""
    if record is None:
        return None, None
    region = next((r for r in record.get("regions", []) if r.get("id") == region_id), None)
    return record.get("source"), (region or {}).get("category")
