"""Convert RefCOCOg (or RefCOCO / RefCOCO+) from the refer toolkit's files to webdataset shards.

Reads ``REFER_ROOT/<dataset>/refs(<split-by>).p`` and ``REFER_ROOT/<dataset>/instances.json``
(the layout of https://github.com/lichengunc/refer) and the COCO train2014 images, and writes one
sample per image and split holding every referred object of the image::

    python data_prep/refcocog.py --refer-root data/refer --coco-images data/coco/train2014 --out shards/refcocog

Each ref is joined to its COCO annotation on ``ann_id``: the box is the annotation's ``bbox``
(``xywh``, converted to ``xyxy`` once, here), the category its ``category_id`` mapped to the
index of the dataset's categories sorted by id (COCO's 80), the segmentation is kept, and the
image file is ``instances.json``'s ``images[].file_name`` (``COCO_train2014_<12 digits>.jpg``),
not the ref's ``file_name``, which has ``_<ann_id>`` appended. Several refs of one annotation
become one region with all their sentences: ``captions`` and ``referring`` hold the cleaned
sentences (the toolkit's ``sent``, whitespace-normalised), ``captions_raw`` the ``raw`` ones.

Security: ``refs(*).p`` files are Python pickles, and unpickling runs code named in the file.
Only convert refs files from a trusted source (the refer toolkit's own downloads).

See ``data_prep/README.md`` for the output layout and the skip reasons.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.data.convert import (
    InputError,
    SkipLog,
    add_common_arguments,
    clean_text,
    ordered_splits,
    run_cli,
    settings_from_args,
    write_shard_sets,
)
from fineregion_pl.data.schemas import CocoAnnotation, CocoCategory, CocoImage, ReferRef, check_list, read_json_file

DEFAULT_SPLIT_BY = {"refcocog": "umd", "refcoco": "unc", "refcoco+": "unc"}
SOURCES = {"refcocog": "refcocog", "refcoco": "refcoco", "refcoco+": "refcoco+"}
SPLITS = {"umd": ["train", "val", "test"], "google": ["train", "val"], "unc": ["train", "val", "testA", "testB"]}


def _redecode(obj: Any) -> Any:
    """Undo ``encoding="latin1"`` on a Python 2 pickle: strings that are UTF-8 bytes become proper text."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_redecode(v) for v in obj]
    if isinstance(obj, dict):
        return {_redecode(k): _redecode(v) for k, v in obj.items()}
    return obj


def load_refs(path: Path) -> list[dict]:
    """The refs of a refer-toolkit pickle (Python 2 pickles with non-ASCII text included). Trusted files only."""
    with open(path, "rb") as f:
        try:
            try:
                refs = pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                refs = _redecode(pickle.load(f, encoding="latin1"))
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
            raise InputError(f"{path}: not a readable refs pickle ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated'})") from None
    if not isinstance(refs, list):
        raise InputError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    return refs


def load_instances(path: Path) -> dict:
    """``instances.json`` as ``{"annotations": {id: ann}, "images": {id: image}, "categories": [sorted by id]}``."""
    data = read_json_file(path, "instances file")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a COCO object with images, annotations and categories, found {type(data).__name__}")
    for key, model in (("images", CocoImage), ("annotations", CocoAnnotation), ("categories", CocoCategory)):
        check_list(model, data.get(key, []), f"{path}: {key}", key.rstrip("s").replace("categorie", "category"))
    return {
        "annotations": {a["id"]: a for a in data.get("annotations", [])},
        "images": {i["id"]: i for i in data.get("images", [])},
        "categories": sorted(data.get("categories", []), key=lambda c: c["id"]),
    }


def category_index(categories: list[dict]) -> dict[int, tuple[int, str]]:
    """Original (gapped) category id -> (contiguous index in id order, name)."""
    return {c["id"]: (i, c["name"]) for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}


def coco_file_name(ref: dict, image: Optional[dict]) -> str:
    """The COCO image file of a ref: ``instances.json``'s name, else the ref's name without its ``_<ann_id>`` suffix."""
    if image and image.get("file_name"):
        return image["file_name"]
    name = str(ref.get("file_name") or f"COCO_train2014_{int(ref['image_id']):012d}.jpg")
    suffix = f"_{ref['ann_id']}.jpg"
    return name[: -len(suffix)] + ".jpg" if name.endswith(suffix) else name


def _sentences(refs: list[dict], split: str, where: str, log: SkipLog) -> tuple[list[str], list[str], list[Any]]:
    """Cleaned and raw sentences of an annotation's refs, and their ids; empty ones are counted and dropped."""
    sentences = [(s, ref) for ref in refs for s in ref.get("sentences", [])]
    cleaned = [(clean_text(s.get("sent") if s.get("sent") is not None else s.get("raw")), s, ref) for s, ref in sentences]
    for _, s, ref in [c for c in cleaned if not c[0]]:
        log.add(split, "sentences", "empty_text", f"{where} ref {ref.get('ref_id')} sentence {s.get('sent_id')} is empty")
    kept = [(text, s) for text, s, _ in cleaned if text]
    return [t for t, _ in kept], [str(s.get("raw") if s.get("raw") is not None else t) for t, s in kept], [s.get("sent_id") for _, s in kept]


def region_of(ann_refs: list[dict], ann: dict, categories: dict[int, tuple[int, str]], split: str, where: str, log: SkipLog) -> dict:
    """The region job of one annotation and the refs that point at it."""
    captions, raw, sentence_ids = _sentences(ann_refs, split, where, log)
    category_id = ann.get("category_id", ann_refs[0].get("category_id"))
    index, name = categories.get(category_id, (None, None))
    ref_ids = [r.get("ref_id") for r in ann_refs]
    return {
        "label": f"ref {', '.join(map(str, ref_ids))} ann {ann['id']}",
        "bbox_xywh": ann.get("bbox"),
        "fields": {"id": ann["id"], "category": name, "category_id": index, "captions": captions, "captions_raw": raw,
                   "referring": list(captions), "segmentation": ann.get("segmentation"), "ref_ids": ref_ids, "sentence_ids": sentence_ids},
    }


def build_jobs(refs: list[dict], instances: dict, coco_images: Path, source_file: str, splits: list[str], log: SkipLog) -> dict[str, list[dict]]:
    """Image jobs by split (``splits`` and any other split the refs name): refs grouped by (split, image, annotation), joined to ``instances.json``."""
    grouped: dict[tuple, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for ref in refs:
        grouped[(str(ref.get("split")), ref["image_id"])][ref["ann_id"]].append(ref)
    categories = category_index(instances["categories"])
    jobs: dict[str, list[dict]] = {split: [] for split in ordered_splits([*splits, *(s for s, _ in grouped)])}
    for (split, image_id), by_ann in grouped.items():
        where = f"{source_file}: image {image_id}"
        regions = []
        for ann_id, ann_refs in by_ann.items():
            ann = instances["annotations"].get(ann_id)
            if ann is None:
                ref_ids = ", ".join(str(r.get("ref_id")) for r in ann_refs)
                log.add(split, "regions", "missing_annotation", f"{where} ref {ref_ids} ann {ann_id} has no annotation in instances.json")
                continue
            regions.append(region_of(ann_refs, ann, categories, split, where, log))
        if not regions:
            log.add(split, "images", "no_valid_regions", f"{where} has no referred object with an annotation")
            continue
        image = instances["images"].get(image_id)
        name = coco_file_name(next(iter(by_ann.values()))[0], image)
        jobs[split].append({
            "key": str(image_id), "image_id": image_id, "split": split, "source_file": source_file,
            "files": [[str(coco_images / name), name], [str(coco_images / "train2014" / name), name]],
            "width": (image or {}).get("width"), "height": (image or {}).get("height"),
            "extra": {}, "regions": regions, "questions": [],
        })
    return jobs


def convert(args: argparse.Namespace) -> tuple[str, dict[str, dict], None]:
    """Run the conversion described by the parsed flags; returns ``(source, manifests, None)``."""
    settings = settings_from_args(args)
    split_by = args.split_by or DEFAULT_SPLIT_BY[args.dataset]
    folder = Path(args.refer_root) / args.dataset
    refs_path, instances_path = folder / f"refs({split_by}).p", folder / "instances.json"
    for path in (refs_path, instances_path):
        if not path.is_file():
            raise InputError(f"{path} not found: --refer-root must be the refer toolkit's data folder holding {args.dataset}/")
    if not Path(args.coco_images).is_dir():
        raise InputError(f"--coco-images {args.coco_images} is not a folder (want the COCO train2014 images)")
    instances = load_instances(instances_path)
    log = SkipLog(settings.strict)
    refs = check_list(ReferRef, load_refs(refs_path), str(refs_path), "ref")
    jobs = build_jobs(refs, instances, Path(args.coco_images), refs_path.name, SPLITS[split_by], log)
    extra = {"dataset": args.dataset, "split_by": split_by, "num_refs_in_file": len(refs),
             "source_files": [str(refs_path), str(instances_path)]}
    categories = [c["name"] for c in instances["categories"]]
    source = SOURCES[args.dataset]
    return source, write_shard_sets(source, jobs, settings, log, categories, extra), None


def build_parser() -> argparse.ArgumentParser:
    """The command line of this converter."""
    parser = argparse.ArgumentParser(
        prog="data_prep/refcocog.py",
        description="Convert RefCOCOg / RefCOCO / RefCOCO+ (refer toolkit files + COCO train2014 images) to webdataset shards, "
                    "one sample per image with all its referred objects. refs(*).p are pickles: use trusted files only.",
    )
    parser.add_argument("--refer-root", required=True, help="the refer toolkit's data folder, holding <dataset>/refs(<split-by>).p and <dataset>/instances.json")
    parser.add_argument("--coco-images", required=True, help="folder of the COCO train2014 images (COCO_train2014_<12 digits>.jpg), or its parent")
    parser.add_argument("--dataset", choices=sorted(DEFAULT_SPLIT_BY), default="refcocog", help="which refer dataset to convert (default: %(default)s)")
    parser.add_argument("--split-by", choices=["umd", "google", "unc"], default=None,
                        help="which refs file: refcocog umd (train/val/test) or google (train/val); refcoco/refcoco+ unc "
                             "(default: umd for refcocog, unc otherwise)")
    add_common_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit code (0, or 2 on a bad input or, with --strict, a bad record)."""
    return run_cli(convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
