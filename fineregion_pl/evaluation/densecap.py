"""DenseCap mAP, as DynRefer's and ControlCap's Python port of DenseCap's Lua evaluator computes it.

Per image: ground-truth boxes overlapping with IoU >= 0.7 are merged into one box (their mean)
carrying all their captions; detections, best score first, are matched to the merged box they
overlap most, each merged box at most once (a detection only claims one it overlaps at all);
each detection's caption is scored by METEOR 1.5 against its box's captions. AP (100 recall
points ``0, 0.01, ..., 0.99``) for every IoU threshold in {0.3, 0.4, 0.5, 0.6, 0.7} and METEOR
threshold in {0, 0.05, 0.1, 0.15, 0.2, 0.25}; mAP is their mean, detection mAP the same without
the METEOR condition. IoU is torchvision's (no +1 pixel, unlike the Lua code), so numbers can
differ slightly from the Lua evaluator's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


def merge_boxes(boxes: torch.Tensor, threshold: float = 0.7) -> list[list[int]]:
    """Groups of ground-truth box indices to merge: repeatedly the box overlapping most others (IoU >= ``threshold``) with those."""
    from torchvision.ops import box_iou

    overlap = box_iou(boxes, boxes) >= threshold
    groups = []
    while True:
        counts = overlap.sum(0)
        top = int(counts.argmax())
        if counts[top] == 0:
            return groups
        members = overlap[top].nonzero().flatten()
        groups.append(members.tolist())
        overlap[members, :] = False
        overlap[:, members] = False


def densecap_map(ground_truth: dict[Any, list[dict]], detections: dict[Any, list[dict]], meteor_scores) -> dict[str, float]:
    """DenseCap ``mAP`` and ``detection_mAP``.

    Args:
        ground_truth: per image, ``[{"box": xyxy, "captions": [...]}]``.
        detections: per image, ``[{"box": xyxy, "caption", "score"}]``.
        meteor_scores: ``(references: {k: [str]}, candidates: {k: [str]}) -> per-key scores`` (METEOR 1.5).
    """
    from torchvision.ops import box_iou

    records, positives = [], 0
    for image_id, truth in ground_truth.items():
        boxes = torch.tensor([t["box"] for t in truth], dtype=torch.float64)
        groups = merge_boxes(boxes)
        merged = torch.stack([boxes[g].mean(0) for g in groups])
        captions = [[c for i in g for c in truth[i]["captions"]] for g in groups]
        positives += len(groups)
        found = sorted(detections.get(image_id, []), key=lambda d: -d["score"])
        if not found:
            continue
        iou = box_iou(torch.tensor([d["box"] for d in found], dtype=torch.float64), merged)
        used = [False] * len(groups)
        for row, detection in enumerate(found):
            best = int(iou[row].argmax())
            overlap = float(iou[row, best])
            claims = overlap > 0 and not used[best]
            if claims:
                used[best] = True
            records.append({"ok": claims, "iou": overlap, "caption": detection["caption"], "references": captions[best] if overlap > 0 else [], "score": detection["score"]})
    if not records:
        return {"mAP": 0.0, "detection_mAP": 0.0, "detections": 0, "ground_truth_boxes": positives}
    meteor = meteor_scores({i: r["references"] or [""] for i, r in enumerate(records)}, {i: [r["caption"]] for i, r in enumerate(records)})
    order = sorted(range(len(records)), key=lambda i: -records[i]["score"])

    def average_precision(iou_t: float, meteor_t: float) -> float:
        hits = torch.tensor([1.0 if records[i]["ok"] and records[i]["references"] and records[i]["iou"] >= iou_t and meteor[i] > meteor_t else 0.0 for i in order], dtype=torch.float64)
        tp, fp = hits.cumsum(0), (1 - hits).cumsum(0)
        recall, precision = tp / max(positives, 1), tp / (tp + fp)
        return float(torch.stack([(precision * (recall >= t)).max() for t in torch.arange(0, 1, 0.01, dtype=torch.float64)]).mean())

    aps = defaultdict(list)
    for iou_t in IOU_THRESHOLDS:
        aps["detection"].append(average_precision(iou_t, -1.0))
        for meteor_t in METEOR_THRESHOLDS:
            aps["caption"].append(average_precision(iou_t, meteor_t))
    return {"mAP": sum(aps["caption"]) / len(aps["caption"]), "detection_mAP": sum(aps["detection"]) / len(aps["detection"]),
            "detections": len(records), "ground_truth_boxes": positives}
