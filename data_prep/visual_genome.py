"""Convert Visual Genome region descriptions to webdataset shards, one sample per image with all its regions.

Reads ``VG_ROOT/image_data.json`` and ``VG_ROOT/region_descriptions.json`` (and, when present or
given, ``objects.json`` and ``relationships.json``); images are looked up under ``VG_ROOT/VG_100K/``
and ``VG_ROOT/VG_100K_2/`` (the folder named in ``image_data.json``'s url first)::

    python data_prep/visual_genome.py --vg-root data/vg --out shards/vg
    python data_prep/visual_genome.py --vg-root data/vg --split-file densecap_splits.json --out shards/vg

Both key layouts of the region file are read: v1.2 (``region_id``, ``image_id`` per region) and
v1.0 (``id``, ``image`` per region, ``id`` per image). Region boxes (``x, y, width, height``) are
converted to ``xyxy`` once, in the shared writer. Phrases are cleaned (stripped, whitespace
collapsed) into ``captions``; the raw text is kept in ``captions_raw``.

Categories come from ``objects.json``: the vocabulary is the ``--max-categories`` most frequent
object names (lower-cased, cleaned; ties by name); a region's category is the name of the object
of its image whose box overlaps it most, if that IoU is at least ``--match-iou`` and the name is in
the vocabulary, else null. Relationships become questions ``"what is the relation of the
<subject> to the <object>?"`` (answer: the predicate) between the regions that best match the
subject and object boxes (IoU >= ``--match-iou``); the others are counted as skipped.

Splits: ``--split-file`` (``{"train": [ids], "val": [...], "test": [...]}``, as DenseCap's) or a
hash of each image id with ``--split-ratios`` (recorded in the manifests). See
``data_prep/README.md`` for the output layout and the skip reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fineregion_pl.data.convert import (
    InputError,
    SkipLog,
    add_common_arguments,
    best_matches,
    clean_text,
    hash_split,
    run_cli,
    settings_from_args,
    write_shard_sets,
)
from fineregion_pl.data.schemas import VgImage, VgObjectEntry, VgRegionEntry, VgRelationshipEntry, check_list, check_split_file, read_json_file

SPLITS = ("train", "val", "test")
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
QUESTION = "what is the relation of the {subject} to the {object}?"


SCHEMAS = {"image data": VgImage, "region descriptions": VgRegionEntry, "objects": VgObjectEntry, "relationships": VgRelationshipEntry}


def load_json(path: Path, what: str) -> Any:
    """A JSON file, with a one-line error naming it when it is missing or broken, or (for the four
    annotation files) when it is not a list of entries of the right shape (``data/schemas.py``)."""
    if not Path(path).is_file():
        raise InputError(f"{path} not found (the {what}); give --vg-root or the file's own flag")
    data = read_json_file(path, what)
    return check_list(SCHEMAS[what], data, str(path)) if what in SCHEMAS else data


def as_image_id(value: Any) -> Any:
    """An image id given directly or as an image dict (``{"image_id": ...}`` or ``{"id": ...}``)."""
    return value.get("image_id", value.get("id")) if isinstance(value, dict) else value


def entry_image_id(entry: dict) -> Any:
    """The image id of a per-image entry in any VG file and version (``image_id``, ``id`` or ``image``)."""
    return as_image_id(entry.get("image_id", entry.get("id", entry.get("image"))))


def xywh_of(item: dict) -> list:
    """The raw ``[x, y, w, h]`` of a VG region, object or relationship end (``width``/``height`` or ``w``/``h``)."""
    return [item.get("x"), item.get("y"), item.get("width", item.get("w")), item.get("height", item.get("h"))]


def name_of(item: dict) -> str:
    """The cleaned, lower-cased name of a VG object (``names[0]`` or ``name``)."""
    names = item.get("names") or [item.get("name")]
    return clean_text(names[0]).lower()


def image_table(image_data: list[dict]) -> dict[Any, dict]:
    """``image_data.json`` by image id."""
    return {entry_image_id(e): e for e in image_data}


def regions_by_image(region_data: list[dict]) -> dict[Any, list[dict]]:
    """Regions of ``region_descriptions.json`` (v1.0 or v1.2 keys) by image id, in file order."""
    by_image: dict[Any, list[dict]] = {}
    for entry in region_data:
        for region in entry.get("regions", []):
            image_id = as_image_id(region.get("image_id", region.get("image", entry_image_id(entry))))
            by_image.setdefault(image_id, []).append(region)
    return by_image


def objects_by_image(object_data: list[dict]) -> dict[Any, tuple[list[str], np.ndarray]]:
    """Object names and ``xywh`` boxes ``(n, 4)`` by image id."""
    table = {}
    for entry in object_data:
        objects = entry.get("objects", [])
        table[entry_image_id(entry)] = ([name_of(o) for o in objects], boxes_array(objects))
    return table


def vocabulary(objects: dict[Any, tuple[list[str], np.ndarray]], max_categories: Optional[int]) -> list[str]:
    """The most frequent object names (ties by name), at most ``max_categories`` of them."""
    counts = Counter(name for names, _ in objects.values() for name in names if name)
    return sorted(counts, key=lambda n: (-counts[n], n))[:max_categories]


def _number(value: Any) -> float:
    """A float, NaN when ``value`` is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def boxes_array(items: list[dict]) -> np.ndarray:
    """``(n, 4)`` float ``xywh`` boxes of VG regions, objects or relationship ends (NaN where a value is unusable)."""
    return np.array([[_number(v) for v in xywh_of(item)] for item in items], dtype=np.float64).reshape(-1, 4)


def region_categories(boxes: np.ndarray, objects: Optional[tuple[list[str], np.ndarray]], index: dict[str, int], min_iou: float) -> list[tuple[Optional[str], Optional[int]]]:
    """``(category, category_id)`` of each region box: the best-overlapping object's name when in the vocabulary."""
    if objects is None:
        return [(None, None)] * len(boxes)
    names, object_boxes = objects
    matches = best_matches(boxes, object_boxes, min_iou)
    return [(names[m], index[names[m]]) if m is not None and names[m] in index else (None, None) for m in matches]


def questions_of(relationships: list[dict], boxes: np.ndarray, region_ids: list[Any], split: str, where: str, min_iou: float, log: SkipLog) -> list[dict]:
    """Spatial questions from an image's relationships, between the regions matching subject and object."""
    subjects = best_matches(boxes_array([r.get("subject") or {} for r in relationships]), boxes, min_iou)
    objects = best_matches(boxes_array([r.get("object") or {} for r in relationships]), boxes, min_iou)
    questions, seen = [], set()
    for rel, s, o in zip(relationships, subjects, objects):
        label = f"{where} relationship {rel.get('relationship_id', rel.get('id'))}"
        subject, obj, predicate = name_of(rel.get("subject") or {}), name_of(rel.get("object") or {}), clean_text(rel.get("predicate")).lower()
        if not (subject and obj and predicate):
            log.add(split, "questions", "empty_text", f"{label} has an empty subject, object or predicate")
        elif s is None or o is None:
            log.add(split, "questions", "no_matching_region", bad=False, message=f"{label}: no region matches its {'subject' if s is None else 'object'} (IoU < {min_iou:g})")
        elif s == o:
            log.add(split, "questions", "same_region", bad=False, message=f"{label}: subject and object match the same region {region_ids[s]}")
        else:
            question = {"regions": [region_ids[s], region_ids[o]], "question": QUESTION.format(subject=subject, object=obj), "answer": predicate}
            key = json.dumps(question, sort_keys=True)
            if key in seen:
                log.add(split, "questions", "duplicate", bad=False, message=f"{label} repeats an earlier question")
                continue
            seen.add(key)
            questions.append(question)
    return questions


def image_files(vg_root: Path, image_id: Any, info: Optional[dict]) -> list[list[str]]:
    """Candidate ``[path, file name]`` of an image: the url's folder first, then the other VG folders."""
    url = (info or {}).get("url") or ""
    parts = url.rstrip("/").split("/")
    first = [f"{parts[-2]}/{parts[-1]}"] if len(parts) >= 2 and parts[-2] in IMAGE_FOLDERS else []
    names = first + [f"{folder}/{image_id}.jpg" for folder in IMAGE_FOLDERS if f"{folder}/{image_id}.jpg" not in first]
    return [[str(vg_root / name), name] for name in names]


def read_split_file(path: Path) -> dict[str, str]:
    """Image id (as a string) -> split, from a ``{"train": [ids], ...}`` file; an id in two splits is an error."""
    data = check_split_file(load_json(path, "split file"), str(path))
    assigned: dict[str, str] = {}
    for split, ids in data.items():
        for image_id in ids:
            if assigned.setdefault(str(image_id), split) != split:
                raise InputError(f"{path}: image {image_id} is in both {assigned[str(image_id)]} and {split}")
    return assigned


def region_job(region: dict, category: tuple[Optional[str], Optional[int]]) -> dict:
    """The region job of one raw VG region."""
    raw = region.get("phrase")
    text = clean_text(raw)
    region_id = region.get("region_id", region.get("id"))
    return {
        "label": f"region {region_id}",
        "bbox_xywh": xywh_of(region),
        "fields": {"id": region_id, "category": category[0], "category_id": category[1], "captions": [text] if text else [],
                   "captions_raw": ["" if raw is None else str(raw)], "referring": [], "segmentation": None},
    }


def image_job(image_id: Any, regions: list[dict], split: str, context: dict, log: SkipLog) -> dict:
    """The image job of one VG image: its regions with categories and its relationship questions."""
    info = context["images"].get(image_id)
    boxes = boxes_array(regions)
    categories = region_categories(boxes, context["objects"].get(image_id) if context["objects"] is not None else None, context["index"], context["min_iou"])
    region_ids = [r.get("region_id", r.get("id")) for r in regions]
    where = f"{context['relationships_file']}: image {image_id}"
    questions = questions_of(context["relationships"].get(image_id, []), boxes, region_ids, split, where, context["min_iou"], log) if context["relationships"] else []
    return {
        "key": str(image_id), "image_id": image_id, "split": split, "source_file": context["regions_file"],
        "files": image_files(context["vg_root"], image_id, info),
        "width": (info or {}).get("width"), "height": (info or {}).get("height"),
        "extra": {"coco_id": (info or {}).get("coco_id"), "flickr_id": (info or {}).get("flickr_id")},
        "regions": [region_job(r, c) for r, c in zip(regions, categories)],
        "questions": questions,
    }


def _input_paths(args: argparse.Namespace) -> dict[str, Optional[Path]]:
    """The annotation files to read: the flags' files, else the standard names under ``--vg-root`` (optional ones when present)."""
    root = Path(args.vg_root)
    optional = {key: getattr(args, key) or (root / f"{key}.json" if (root / f"{key}.json").is_file() else None) for key in ("objects", "relationships")}
    return {"regions": Path(args.regions or root / "region_descriptions.json"), "image_data": Path(args.image_data or root / "image_data.json"),
            **{k: Path(v) if v else None for k, v in optional.items()}}


def _split_assigner(args: argparse.Namespace) -> tuple[Any, list[str], dict]:
    """A function image id -> split (or None), the split names, and what the manifests record about the split."""
    if args.split_file:
        assigned = read_split_file(Path(args.split_file))
        return (lambda image_id: assigned.get(str(image_id))), sorted(set(assigned.values())), {"split_file": str(args.split_file)}
    ratios = dict(zip(SPLITS, args.split_ratios))
    if any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
        raise InputError(f"--split-ratios must be >= 0 with a positive sum, not {args.split_ratios}")
    ratios = {k: v / sum(ratios.values()) for k, v in ratios.items()}
    names = [k for k, v in ratios.items() if v > 0]
    return (lambda image_id: hash_split(image_id, ratios)), names, {"split_ratios": ratios, "split_method": "sha256 of the image id"}


def convert(args: argparse.Namespace) -> tuple[str, dict[str, dict], dict]:
    """Run the conversion described by the parsed flags; returns ``(source, manifests, unassigned counts)``."""
    settings = settings_from_args(args)
    paths = _input_paths(args)
    split_of, split_names, split_info = _split_assigner(args)
    log = SkipLog(settings.strict)
    images = image_table(load_json(paths["image_data"], "image data"))
    regions = regions_by_image(load_json(paths["regions"], "region descriptions"))
    objects = objects_by_image(load_json(paths["objects"], "objects")) if paths["objects"] else None
    categories = vocabulary(objects, args.max_categories) if objects is not None else []
    relationships = {entry_image_id(e): e.get("relationships", []) for e in load_json(paths["relationships"], "relationships")} if paths["relationships"] else None
    context = {"vg_root": Path(args.vg_root), "images": images, "objects": objects, "relationships": relationships,
               "index": {name: i for i, name in enumerate(categories)}, "min_iou": args.match_iou,
               "regions_file": paths["regions"].name, "relationships_file": paths["relationships"].name if paths["relationships"] else ""}
    jobs: dict[str, list[dict]] = {split: [] for split in split_names}
    unassigned = Counter()
    for image_id, image_regions in regions.items():
        split = split_of(image_id)
        if split is None:
            unassigned.update(images=1, regions=len(image_regions))
            continue
        jobs[split].append(image_job(image_id, image_regions, split, context, log))
    if args.split_file:
        split_info["not_in_split_file"] = {"images": unassigned["images"], "regions": unassigned["regions"]}
    extra = {**split_info, "source_files": {k: str(v) for k, v in paths.items() if v}, "match_iou": args.match_iou,
             "max_categories": args.max_categories}
    return "visual_genome", write_shard_sets("visual_genome", jobs, settings, log, categories, extra), dict(unassigned)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this converter."""
    parser = argparse.ArgumentParser(
        prog="data_prep/visual_genome.py",
        description="Convert Visual Genome region descriptions (v1.0 or v1.2 files) to webdataset shards, one sample per image with all its regions.",
    )
    parser.add_argument("--vg-root", required=True, help="Visual Genome folder: image_data.json, region_descriptions.json, optional objects.json "
                                                         "and relationships.json, and the VG_100K/ and VG_100K_2/ image folders")
    parser.add_argument("--regions", default=None, help="region descriptions file (default: VG_ROOT/region_descriptions.json)")
    parser.add_argument("--image-data", default=None, help="image data file with sizes and urls (default: VG_ROOT/image_data.json)")
    parser.add_argument("--objects", default=None, help="objects file for region categories (default: VG_ROOT/objects.json when it exists)")
    parser.add_argument("--relationships", default=None, help="relationships file for spatial questions (default: VG_ROOT/relationships.json when it exists)")
    parser.add_argument("--split-file", default=None, help='JSON {"train": [image ids], "val": [...], "test": [...]} (e.g. DenseCap\'s); '
                                                           "images it does not list are left out and counted")
    parser.add_argument("--split-ratios", type=float, nargs=3, default=[0.9, 0.05, 0.05], metavar=("TRAIN", "VAL", "TEST"),
                        help="without --split-file: train/val/test shares of a deterministic hash split of the image ids (default: 0.9 0.05 0.05)")
    parser.add_argument("--max-categories", type=int, default=1000, help="size of the category vocabulary: the K most frequent object names (default: %(default)s)")
    parser.add_argument("--match-iou", type=float, default=0.5,
                        help="least IoU for a region to take an object's name or a relationship's subject/object (default: %(default)s)")
    add_common_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit code (0, or 2 on a bad input or, with --strict, a bad record)."""
    return run_cli(convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
