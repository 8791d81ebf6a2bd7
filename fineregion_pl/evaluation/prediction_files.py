"""Predictions files of any model, read for scoring: GLaMM's, Groma's, Osprey's, GRiT's and ours.

- captions (``regcap``): a COCO caption-results list ``[{"image_id", "caption"}]`` (GLaMM's per-rank
  files, Groma's, Osprey's with string ids, this package's ``predictions.json``), as one file or a
  folder of per-rank files (every ``*.json`` but ``merged.json``, as GLaMM's ``evaluate.py`` merges them);
- dense captions (``densecap``): COCO detection results with a caption,
  ``[{"image_id", "bbox": [x, y, w, h], "caption" (or GRiT's "object_descriptions"), "score"}]``;
- boxes (``rec``, ``gt-ranking``): COCO detection results, one per sentence, ``[{"image_id", "bbox": [x, y, w, h]}]``
  (``"bbox": null``: no candidate to pick, a miss).

An id that is not in the annotation file, or one that appears twice, stops with a line naming the
file, the entry and the id: results are never silently deduplicated (a repeated id is what a
padded ``DistributedSampler`` produces).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fineregion_pl.data.annotations import AnnotationFile
from fineregion_pl.data.json_files import read_json_file
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError


def read_prediction_rows(path: str | Path) -> tuple[list[tuple[str, dict]], list[Path]]:
    """``([(where, row)], files)`` of a predictions file or folder of per-rank files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if p.name != "merged.json")
        if not files:
            raise BadInputError(f"predictions folder {path} has no *.json files")
    else:
        files = [path]
    rows = []
    for file in files:
        data = read_json_file(file, "predictions file")
        if not isinstance(data, list):
            raise BadInputError(f"{file}: expected a JSON list of results [{{'image_id', ...}}], got {type(data).__name__}")
        rows += [(f"{file}: entry {n}", row) for n, row in enumerate(data)]
    return rows, files


def _item_id(row: Any, where: str, ids: dict[str, Any], annotations: AnnotationFile) -> Any:
    if not isinstance(row, dict) or "image_id" not in row:
        raise BadInputError(f"{where} has no 'image_id'")
    key = row["image_id"]
    if not isinstance(key, bool) and str(key) in ids:  # by text: Osprey writes ids as strings
        return ids[str(key)]
    raise BadInputError(f"{where} has image_id {key!r}, which is not in {annotations.path.name} (every result's id must be in the ground truth, as COCO.loadRes requires)")


def _unique(rows: list[tuple[str, dict]], annotations: AnnotationFile) -> list[tuple[str, Any, dict]]:
    ids = {str(item.id): item.id for item in annotations.items}
    seen: dict[Any, str] = {}
    out = []
    for where, row in rows:
        item_id = _item_id(row, where, ids, annotations)
        if item_id in seen:
            raise BadInputError(f"{where} repeats image_id {item_id!r} (first at {seen[item_id].rsplit(': ', 1)[-1]}): one result per id; merge per-rank files without a padded sampler's repeats")
        seen[item_id] = where
        out.append((where, item_id, row))
    return out


def read_caption_predictions(path: str | Path, annotations: AnnotationFile) -> tuple[dict[Any, str], list[Path]]:
    """``({item id: caption}, files read)``."""
    rows, files = read_prediction_rows(path)
    out = {}
    for where, item_id, row in _unique(rows, annotations):
        caption = row.get("caption")
        if not isinstance(caption, str):
            raise BadInputError(f"{where} (image_id {item_id!r}) has no 'caption' string")
        out[item_id] = caption
    return out, files


def _xywh_box(row: dict, where: str, scale: float) -> list[float]:
    raw = row.get("bbox")
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise BadInputError(f"{where} has no 'bbox' [x, y, w, h]: {raw!r}")
    try:
        x, y, w, h = (float(v) / scale for v in raw)
    except (TypeError, ValueError):
        raise BadInputError(f"{where} bbox is not four numbers: {raw!r}") from None
    return check_box([x, y, x + w, y + h], f"{where} bbox")


def read_box_predictions(path: str | Path, annotations: AnnotationFile) -> tuple[dict[Any, list[float]], list[Path]]:
    """``({item id: picked box xyxy, or None}, files read)``: one box per sentence; ``"bbox": null``
    says the model had no candidate to pick (a miss that was evaluated, not a missing prediction)."""
    rows, files = read_prediction_rows(path)
    return {item_id: None if row.get("bbox", "") is None else _xywh_box(row, where, 1.0) for where, item_id, row in _unique(rows, annotations)}, files


def read_dense_predictions(path: str | Path, annotations: AnnotationFile, boxes_scaled_to: int = 0) -> tuple[dict[Any, list[dict]], list[Path]]:
    """``({image id: [{"box", "caption", "score", "region_id"}]}, files read)``; several detections per image
    (``region_id``: the annotated region a detection captions, when it is one, as in this package's output).

    ``boxes_scaled_to``: the longer image side the boxes were written for (GRiT: 720), 0 for original pixels.
    """
    rows, files = read_prediction_rows(path)
    ids = {str(item.id): item.id for item in annotations.items}
    sizes = {item.id: max(item.width, item.height) for item in annotations.items}
    out: dict[Any, list[dict]] = {}
    regions: dict[tuple, str] = {}
    for where, row in rows:
        item_id = _item_id(row, where, ids, annotations)
        region = row.get("region_id")
        if region is not None:  # a caption of an annotated region (ours): one per region
            if (item_id, region) in regions:
                raise BadInputError(f"{where} repeats region {region!r} of image_id {item_id!r} (first at {regions[item_id, region].rsplit(': ', 1)[-1]}): one result per region")
            regions[item_id, region] = where
        caption = row.get("caption", row.get("object_descriptions"))
        if not isinstance(caption, str):
            raise BadInputError(f"{where} has no 'caption' (or GRiT's 'object_descriptions') string")
        score = row.get("score")
        if not isinstance(score, (int, float)):
            raise BadInputError(f"{where} has no numeric 'score' (dense-captioning AP ranks detections by it)")
        scale = boxes_scaled_to / sizes[item_id] if boxes_scaled_to else 1.0
        out.setdefault(item_id, []).append({"box": _xywh_box(row, where, scale), "caption": caption, "score": float(score), "region_id": region})
    return out, files
