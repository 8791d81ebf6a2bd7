"""Readers of the published evaluation files, as they are distributed, into one list of items.

Each reader checks what it reads and stops at the first problem with one line naming the file,
the record and the field. Boxes come out as absolute ``xyxy`` pixels of the original image (the
package's convention): COCO ``[x, y, w, h]`` is converted, ControlCap/DynRefer's ``bbox`` (which
is already ``xyxy`` despite its COCO key) is not. Formats, with the reference code that reads
them: ``docs/evaluation.md``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.data.json_files import read_json_file
from fineregion_pl.data.protocols import Protocol
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError

BOX_TOLERANCE = 2.0  # pixels a box may stick out of its image (rounding in the published files)


@dataclass
class EvalItem:
    """One scored item of an annotation file.

    Attributes:
        id: what predictions are keyed by (GLaMM's and COCOEvalCap's ``image_id``: one per sentence
            in MDETR-style files, one per image in Visual Genome files).
        image: the image's file name (relative to the images folder), None in caption-only files.
        width, height: the original image size the boxes refer to.
        regions: ``[{"id", "box", "captions"}]``: the annotated regions and their reference captions.
        expression: the referring sentence (``rec``, ``gt-ranking``).
        target: the referred box (``rec``, ``gt-ranking``).
        group: items with the same group show the same picture (MDETR repeats a picture once per sentence).
    """

    id: Any
    image: Optional[str]
    width: int
    height: int
    regions: list[dict] = field(default_factory=list)
    expression: Optional[str] = None
    target: Optional[list[float]] = None
    group: Any = None


@dataclass
class AnnotationFile:
    """An annotation file read for one protocol: its items, its SHA-256 and the format it was read as."""

    path: Path
    sha256: str
    format: str
    items: list[EvalItem]

    def by_id(self) -> dict[Any, EvalItem]:
        """Items by id."""
        return {item.id: item for item in self.items}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _field(record: dict, key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise BadInputError(f"{where} has no {key!r}")
    return record[key]


def _box(record: dict, where: str, xyxy: bool, width: float, height: float) -> list[float]:
    raw = _field(record, "bbox", where)
    if isinstance(raw, (list, tuple)) and len(raw) == 4 and not xyxy:
        try:
            x, y, w, h = (float(v) for v in raw)
            raw = [x, y, x + w, y + h]
        except (TypeError, ValueError):
            pass
    box = check_box(raw, f"{where} bbox")
    if box[0] < -BOX_TOLERANCE or box[1] < -BOX_TOLERANCE or box[2] > width + BOX_TOLERANCE or box[3] > height + BOX_TOLERANCE:
        raise BadInputError(f"{where} bbox {raw} is outside its {width:g}x{height:g} image (boxes must be in the original image's pixels)")
    return box


def _region_box(ann: dict, where: str, xyxy: bool, width: int, height: int, with_images: bool) -> Optional[list[float]]:
    """The annotation's box; without images (scoring a predictions file) only when it has one,
    checked against the image size when the file gives one."""
    if not with_images and "bbox" not in ann:
        return None
    return _box(ann, where, xyxy, width or float("inf"), height or float("inf"))


def _size(image: dict, where: str) -> tuple[int, int]:
    width, height = _field(image, "width", where), _field(image, "height", where)
    if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
        raise BadInputError(f"{where} has no positive width/height ({width!r} x {height!r})")
    return int(width), int(height)


def _coco_tables(data: Any, path: Path, protocol: Protocol) -> tuple[list[dict], dict[Any, list[dict]]]:
    """``images`` in file order and annotations by image id, checking ids are unique."""
    if isinstance(data, list):
        raise BadInputError(f"{path}: expected a COCO-style object with 'images' and 'annotations', got a JSON list "
                            f"(is this a predictions or proposals file? {protocol.name} reads {protocol.reads})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise BadInputError(f"{path}: not a COCO-style annotation file (no 'images' and 'annotations' lists); {protocol.name} reads {protocol.reads}")
    seen: set = set()
    for n, image in enumerate(data["images"]):
        image_id = _field(image, "id", f"{path}: images[{n}]")
        if image_id in seen:
            raise BadInputError(f"{path}: images[{n}] repeats image id {image_id!r}")
        seen.add(image_id)
    by_image: dict[Any, list[dict]] = defaultdict(list)
    ann_ids: set = set()
    for n, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{n}]"
        ann_id, image_id = _field(ann, "id", where), _field(ann, "image_id", where)
        if ann_id in ann_ids:
            raise BadInputError(f"{where} repeats annotation id {ann_id!r}")
        if image_id not in seen:
            raise BadInputError(f"{where} (id {ann_id!r}) refers to image {image_id!r}, which is not in 'images'")
        ann_ids.add(ann_id)
        by_image[image_id].append({**ann, "_where": f"{where} (id {ann_id!r})"})
    return data["images"], by_image


def _caption(ann: dict, image: dict, where: str) -> str:
    text = ann.get("caption", image.get("caption"))
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(f"{where} has no 'caption' (on the annotation, or on its image as in MDETR's files)")
    return text


def read_annotations(path: str | Path, protocol: Protocol, with_images: bool = True) -> AnnotationFile:
    """Read ``path`` as ``protocol`` reads it.

    Args:
        path: the annotation file (JSON; Shikra's REC files are JSONL).
        protocol: the protocol (its ``task`` decides what an item is).
        with_images: require image names, sizes and boxes; ``False`` reads caption-only ground truth
            (Osprey's ``captions_refcocog_gt.json``) for scoring predictions files.
    """
    path = Path(path)
    data = read_json_file(path, f"{protocol.name} annotation file")
    if protocol.task in ("rec", "gt-ranking") and path.suffix == ".jsonl":
        items, fmt = _shikra_items(data, path), "shikra-jsonl"
    else:
        xyxy = isinstance(data, dict) and "dataset" in data  # ControlCap/DynRefer converted files: bbox is xyxy
        images, by_image = _coco_tables(data, path, protocol)
        fmt = "controlcap-dynrefer (bbox xyxy)" if xyxy else "coco-style (bbox xywh)"
        read = {"regcap": _regcap_items, "densecap": _densecap_items, "rec": _rec_items, "gt-ranking": _rec_items}[protocol.task]
        items = read(images, by_image, path, protocol, xyxy, with_images)
    if not items:
        raise BadInputError(f"{path}: no {protocol.unit} to evaluate")
    return AnnotationFile(path=path, sha256=file_sha256(path), format=fmt, items=items)


def _image_fields(image: dict, where: str, with_images: bool) -> tuple[Optional[str], int, int]:
    if not with_images:
        return image.get("file_name"), int(image.get("width") or 0), int(image.get("height") or 0)
    name = _field(image, "file_name", where)
    width, height = _size(image, where)
    return str(name), width, height


def _regcap_items(images: list[dict], by_image: dict, path: Path, protocol: Protocol, xyxy: bool, with_images: bool) -> list[EvalItem]:
    items = []
    for n, image in enumerate(images):
        where = f"{path}: images[{n}] (id {image['id']!r})"
        anns = by_image.get(image["id"], [])
        if len(anns) != 1:
            hint = "; GRiT's multi-region test.json is protocol vg-densecap" if len(anns) > 1 else ""
            raise BadInputError(f"{where} has {len(anns)} annotations: {protocol.name} scores one region per image entry{hint}")
        ann = anns[0]
        name, width, height = _image_fields(image, where, with_images)
        box = _region_box(ann, ann["_where"], xyxy, width, height, with_images)
        region = {"id": ann["id"], "box": box, "captions": [_caption(ann, image, ann["_where"])]}
        items.append(EvalItem(id=image["id"], image=name, width=width, height=height, regions=[region]))
    return items


def _densecap_items(images: list[dict], by_image: dict, path: Path, protocol: Protocol, xyxy: bool, with_images: bool) -> list[EvalItem]:
    items = []
    for n, image in enumerate(images):
        where = f"{path}: images[{n}] (id {image['id']!r})"
        name, width, height = _image_fields(image, where, with_images)
        regions = [{"id": a["id"], "box": _region_box(a, a["_where"], xyxy, width, height, with_images),
                    "captions": [_caption(a, {}, a["_where"])]} for a in by_image.get(image["id"], [])]
        if regions:  # GRiT's reader skips images without annotations
            items.append(EvalItem(id=image["id"], image=name, width=width, height=height, regions=regions))
    return items


def _rec_items(images: list[dict], by_image: dict, path: Path, protocol: Protocol, xyxy: bool, with_images: bool) -> list[EvalItem]:
    items = []
    for n, image in enumerate(images):
        where = f"{path}: images[{n}] (id {image['id']!r})"
        anns = by_image.get(image["id"], [])
        if len(anns) != 1:
            raise BadInputError(f"{where} has {len(anns)} annotations: MDETR's REC files pair each sentence with one box")
        expression = image.get("caption")
        if not isinstance(expression, str) or not expression.strip():
            raise BadInputError(f"{where} has no 'caption' (the referring sentence)")
        name, width, height = _image_fields(image, where, True)
        target = _box(anns[0], anns[0]["_where"], xyxy, width, height)
        group = image.get("original_id", name)
        items.append(EvalItem(id=image["id"], image=name, width=width, height=height, expression=expression, target=target, group=group))
    return items


def _shikra_items(rows: list, path: Path) -> list[EvalItem]:
    items = []
    for n, row in enumerate(rows):
        where = f"{path}: line {n + 1}"
        name = str(_field(row, "img_path", where))
        width, height = _size(row, where)
        target = _box(row, where, True, width, height)
        expression = _field(row, "expression", where)
        items.append(EvalItem(id=n, image=name, width=width, height=height, expression=str(expression), target=target, group=name))
    return items


def read_proposals(path: str | Path, annotations: AnnotationFile) -> dict[Any, list[dict]]:
    """A COCO detection-results file (``[{"image_id", "bbox": [x, y, w, h], "score"}]``) as each
    item's candidate boxes ``{"box": xyxy, "score"}``, best score first.

    Every ``image_id`` must be an item of ``annotations`` (as ``COCO.loadRes`` requires); items
    without proposals get none (and count as misses).
    """
    path = Path(path)
    rows = read_json_file(path, "proposals file")
    if not isinstance(rows, list):
        raise BadInputError(f"{path}: expected a COCO detection-results list [{{'image_id', 'bbox', 'score'}}], got {type(rows).__name__}")
    items = annotations.by_id()
    out: dict[Any, list[dict]] = {item_id: [] for item_id in items}
    for n, row in enumerate(rows):
        where = f"{path}: entry {n}"
        image_id = _field(row, "image_id", where)
        if image_id not in items:
            raise BadInputError(f"{where} has image_id {image_id!r}, which is not in {annotations.path.name}")
        item = items[image_id]
        score = row.get("score", 0.0)
        if not isinstance(score, (int, float)):
            raise BadInputError(f"{where} has a non-numeric score {score!r}")
        out[image_id].append({"box": _box(row, where, False, item.width, item.height), "score": float(score)})
    for boxes in out.values():
        boxes.sort(key=lambda p: -p["score"])
    return out


def ranking_candidates(annotations: AnnotationFile) -> dict[Any, list[dict]]:
    """``gt-ranking`` candidates: for each item, every distinct annotated box of its picture (its group)."""
    boxes: dict[Any, list[list[float]]] = defaultdict(list)
    for item in annotations.items:
        if item.target not in boxes[item.group]:
            boxes[item.group].append(item.target)
    return {item.id: [{"box": b, "score": 0.0} for b in boxes[item.group]] for item in annotations.items}
