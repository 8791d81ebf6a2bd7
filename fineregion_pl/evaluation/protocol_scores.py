"""One scoring function per protocol task, shared by ``fineregion-pl test`` and ``fineregion-pl evaluate``.

Whatever produced the predictions (this package's test loop on any number of ranks, or another
model's output file), the same function scores them against the same annotation file.
"""

from __future__ import annotations

from typing import Any

from fineregion_pl.data.protocol_data import ProtocolRun
from fineregion_pl.evaluation.coco_caption import coco_caption_scores, require_java
from fineregion_pl.evaluation.densecap import densecap_map
from fineregion_pl.evaluation.rec import rec_scores
from fineregion_pl.model.errors import BadInputError


def _meteor_per_item(references: dict, candidates: dict) -> list[float]:
    from pycocoevalcap.meteor.meteor import Meteor

    _, scores = Meteor().compute_score(references, candidates)
    return [float(s) for s in scores]


def score_captions(run: ProtocolRun, predictions: dict[Any, str]) -> dict[str, Any]:
    """``regcap``: COCOEvalCap over the predicted items (GLaMM's and Groma's rule), references from the file."""
    references = {item.id: [c for r in item.regions for c in r["captions"]] for item in run.annotations.items}
    scores = coco_caption_scores(references, predictions, java=not run.score_without_java)
    return {**scores, "scored": len(predictions), "in_file": len(references)}


def score_dense(run: ProtocolRun, detections: dict[Any, list[dict]]) -> dict[str, Any]:
    """``densecap``: COCOEvalCap over the detections that caption an annotated region, and DenseCap mAP when asked."""
    references, captions = {}, {}
    for item in run.annotations.items:
        for region in item.regions:
            references[(item.id, region["id"])] = region["captions"]
    for image_id, found in detections.items():
        for d in found:
            if d.get("region_id") is not None and (image_id, d["region_id"]) in references:
                captions[(image_id, d["region_id"])] = d["caption"]
    out: dict[str, Any] = {}
    if captions:
        number = {key: n for n, key in enumerate(references)}
        scores = coco_caption_scores({number[k]: v for k, v in references.items()}, {number[k]: v for k, v in captions.items()}, java=not run.score_without_java)
        out.update(scores)
    out.update(regions_scored=len(captions), regions_in_file=len(references), images_in_file=len(run.annotations.items))
    if run.densecap_map:
        require_java()  # METEOR decides which captions count
        truth = {item.id: item.regions for item in run.annotations.items}
        if any(r["box"] is None for regions in truth.values() for r in regions):
            raise BadInputError(f"{run.annotations.path}: DenseCap mAP needs every region's 'bbox'")
        out.update(densecap_map(truth, detections, _meteor_per_item))
    return out


def score_boxes(run: ProtocolRun, picked: dict[Any, list[float]]) -> dict[str, Any]:
    """``rec`` / ``gt-ranking``: acc@0.5 over every sentence of the file, with chance when the candidates are known."""
    targets = {item.id: item.target for item in run.annotations.items}
    return rec_scores(targets, picked, run.candidates)


def score_run(run: ProtocolRun, predictions: Any) -> dict[str, Any]:
    """Score normalised predictions (captions by id, detections by image, or boxes by id) by ``run``'s protocol."""
    task = run.protocol.task
    if task == "regcap":
        return score_captions(run, predictions)
    if task == "densecap":
        return score_dense(run, predictions)
    return score_boxes(run, predictions)
