"""Writing and finding webdataset shard sets: atomic, byte-reproducible shards and a manifest per split.

Layout of a shard set (what the converters and the synthetic benchmark write)::

    OUT/
      train/manifest.json   {"split", "source", "num_images", "num_regions", "num_sentences",
                             "categories", "shards": ["train-000000.tar", ...], "skipped": {...}}
      train/train-000000.tar
      val/...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import webdataset as wds

from fineregion_pl.model.errors import BadInputError

MANIFEST = "manifest.json"


def encode_sample(key: str, image_bytes: bytes, meta: dict, image_ext: str = "jpg") -> dict[str, Any]:
    """A webdataset sample: the image bytes and the record as compact JSON (deterministic bytes)."""
    return {
        "__key__": key,
        image_ext: image_bytes,
        "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
    }


def shard_writer(pattern: str, maxcount: int = 1000, maxsize: float = 1e9, start_shard: int = 0) -> wds.ShardWriter:
    """A ``webdataset.ShardWriter`` whose shards appear only when complete and are byte-reproducible.

    Each shard is written to ``NAME.tmp`` and renamed to ``NAME`` when it is closed, so an
    interrupted run never leaves a truncated shard under a final name. The tar headers carry a
    fixed mtime and owner, so the same samples give the same bytes.
    """
    return wds.ShardWriter(
        pattern,
        maxcount=maxcount,
        maxsize=maxsize,
        start_shard=start_shard,
        verbose=0,
        opener=lambda name: name + ".tmp",
        post=lambda name: os.replace(name + ".tmp", name),
        mtime=0.0,
        encoder=False,
    )


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(split_dir: Path) -> dict:
    """The manifest of one split folder, with a clear error when it is missing."""
    from fineregion_pl.data.schemas import read_manifest_file

    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"no shard manifest at {path}: make the shards first (see data_prep/ or `fineregion-pl quickstart`)")
    return read_manifest_file(path)


def split_shards(root: Path, split: str, manifest: Optional[dict] = None) -> list[str]:
    """Absolute paths of the shards of ``root/split`` as listed by its manifest."""
    split_dir = Path(root) / split
    manifest = manifest or read_manifest(split_dir)
    shards = [str(split_dir / name) for name in manifest["shards"]]
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise BadInputError(f"{split_dir / MANIFEST} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}")
    return shards
