"""Shared helpers of the converter tests: dataset layouts built from the real fixture records, shard reading.

The fixtures (``/work/shared/fixtures``, or ``$FINEREGION_FIXTURES``) are real Visual Genome and
refer-toolkit records without images; the layouts here copy them into a temporary folder in the
shape each converter reads, with placeholder JPEGs of the sizes the records give.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("FINEREGION_FIXTURES", "/work/shared/fixtures"))
VG = FIXTURES / "visual_genome"
REFER = FIXTURES / "refer"


def need_fixtures() -> None:
    """Skip the calling test when the fixture records are not on this machine."""
    if not (VG / "image_data.json").is_file() or not (REFER / "refcoco_unc_records.json").is_file():
        pytest.skip(f"fixture records not found under {FIXTURES} (set FINEREGION_FIXTURES)")


def load_converter(name: str) -> ModuleType:
    """Import ``data_prep/<name>.py`` (a script, not a package module) once."""
    module_name = f"data_prep_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "data_prep" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def read_json(path: Path) -> Any:
    """A JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def placeholder_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A small deterministic JPEG of ``width x height`` (a colour gradient that depends on ``seed``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient = Image.linear_gradient("L").resize((width, height))
    shade = Image.new("L", (width, height), (37 * seed) % 256)
    Image.merge("RGB", (gradient, shade, gradient.transpose(Image.FLIP_LEFT_RIGHT))).save(path, format="JPEG", quality=60)


# ---------------------------------------------------------------------------------------------
# Visual Genome


def vg_region_data(version: str = "v1.2") -> list[dict]:
    """The fixture's region descriptions in one of its two layouts."""
    return read_json(VG / f"region_descriptions_{version}.json")


def v12_as_v10(region_data: list[dict]) -> list[dict]:
    """v1.2 region descriptions rewritten in the v1.0 keys (``id`` and ``image`` per region, ``id`` per image)."""
    rename = {"region_id": "id", "image_id": "image"}
    return [{"regions": [{rename.get(k, k): v for k, v in r.items()} for r in entry["regions"]], "id": entry["id"]} for entry in region_data]


def vg_layout(root: Path, region_data: Optional[list[dict]] = None, objects: bool = True, relationships: bool = True, images: bool = True) -> Path:
    """A Visual Genome folder: ``image_data.json``, ``region_descriptions.json`` (v1.2 unless given),
    optional ``objects.json`` / ``relationships.json``, and placeholder images in the url's folder."""
    root.mkdir(parents=True, exist_ok=True)
    image_data = read_json(VG / "image_data.json")
    (root / "image_data.json").write_text(json.dumps(image_data), encoding="utf-8")
    (root / "region_descriptions.json").write_text(json.dumps(region_data if region_data is not None else vg_region_data()), encoding="utf-8")
    if objects:
        (root / "objects.json").write_bytes((VG / "objects_v1.2.json").read_bytes())
    if relationships:
        (root / "relationships.json").write_bytes((VG / "relationships_v1.2.json").read_bytes())
    if images:
        for info in image_data:
            folder, name = info["url"].split("/")[-2:]
            placeholder_jpeg(root / folder / name, info["width"], info["height"], seed=info["image_id"])
    return root


# ---------------------------------------------------------------------------------------------
# refer toolkit (RefCOCO / RefCOCOg)


def refer_records(name: str) -> list[dict]:
    """``refcoco_unc_records.json`` or ``refcocog_partial_records.json``."""
    return read_json(REFER / name)


def coco_image_name(record: dict) -> str:
    """The COCO file name of a fixture record's image."""
    return record.get("image_file_name") or f"COCO_train2014_{int(record['image_id']):012d}.jpg"


def ref_of(record: dict, ref_id: Optional[int] = None) -> dict:
    """The refer-toolkit ref of a fixture record (its ``file_name`` with the ``_<ann_id>`` suffix, as in ``refs(*).p``)."""
    suffixed = f"COCO_train2014_{int(record['image_id']):012d}_{record['ann_id']}.jpg"
    file_name = record.get("ref_file_name") or (record["file_name"] if record.get("file_name", "").endswith(f"_{record['ann_id']}.jpg") else suffixed)
    return {"ref_id": record["ref_id"] if ref_id is None else ref_id, "ann_id": record["ann_id"], "image_id": record["image_id"],
            "split": record["split"], "category_id": record["category_id"], "sent_ids": record["sent_ids"],
            "sentences": record["sentences"], "file_name": file_name}


def instances_of(records: list[dict]) -> dict:
    """An ``instances.json`` holding the annotations (records with a bbox) and images (records with a size) of fixture records."""
    annotations = {r["ann_id"]: {"id": r["ann_id"], "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
                                 "segmentation": r.get("segmentation"), "area": r.get("area"), "iscrowd": r.get("iscrowd", 0)}
                   for r in records if r.get("bbox") is not None}
    images = {r["image_id"]: {"id": r["image_id"], "file_name": coco_image_name(r), "width": r["width"], "height": r["height"]}
              for r in records if r.get("width") is not None}
    return {"images": list(images.values()), "annotations": list(annotations.values()), "categories": read_json(FIXTURES / "coco_categories.json")}


def refer_layout(root: Path, refs: list[dict], instances: dict, dataset: str = "refcocog", split_by: str = "umd") -> tuple[Path, Path]:
    """``root/refer/<dataset>/refs(<split_by>).p`` + ``instances.json`` and ``root/coco/train2014`` placeholder images.

    Returns ``(refer_root, coco_images)``.
    """
    folder = root / "refer" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs))
    (folder / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    coco = root / "coco" / "train2014"
    coco.mkdir(parents=True, exist_ok=True)
    for image in instances["images"]:
        placeholder_jpeg(coco / image["file_name"], image["width"], image["height"], seed=image["id"] % 97)
    return root / "refer", coco


# ---------------------------------------------------------------------------------------------
# Reading the output


def read_samples(split_dir: Path) -> list[tuple[str, bytes, dict]]:
    """``(key, jpg bytes, record)`` of every sample of a split, in manifest shard order."""
    manifest = read_json(split_dir / "manifest.json")
    samples = []
    for name in manifest["shards"]:
        with tarfile.open(split_dir / name) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.rsplit(".", 1)[0] for n in files}, key=lambda k: list(files).index(f"{k}.json"))
        samples += [(k, files[f"{k}.jpg"], json.loads(files[f"{k}.json"])) for k in keys]
    return samples


def manifests(out: Path) -> dict[str, dict]:
    """The manifest of every split folder of a shard set."""
    return {p.parent.name: read_json(p) for p in sorted(Path(out).glob("*/manifest.json"))}


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every shard of a shard set by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).glob("*/*.tar"))}
