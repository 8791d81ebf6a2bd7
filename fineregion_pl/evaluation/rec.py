"""Referring expression comprehension scores: a picked box per sentence against its referred box.

A sentence is a hit when the picked box has IoU >= 0.5 with the referred box (Ferret's, Kosmos-2's
and MDETR's rule; Shikra and Groma count IoU > 0.5: the difference matters only at exactly 0.5).
Accuracy is counted over **every** sentence of the annotation file: a sentence without a
prediction or without candidates is a miss. ``chance`` is what picking uniformly at random among
each sentence's candidates would score: the mean over sentences of the fraction of its candidates
that are hits.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from fineregion_pl.model.boxes import matched_box_iou

HIT_IOU = 0.5
HIT_RULE = "IoU >= 0.5 with the referred box (Ferret, Kosmos-2, MDETR; Shikra and Groma count IoU > 0.5)"


def box_iou_one(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes."""
    return float(matched_box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0])


def hit_fraction(candidates: list[list[float]], target: list[float]) -> float:
    """Fraction of ``candidates`` that would be a hit for ``target`` (0 for none)."""
    if not candidates:
        return 0.0
    ious = matched_box_iou(torch.tensor(candidates, dtype=torch.float64), torch.tensor([target] * len(candidates), dtype=torch.float64))
    return float((ious >= HIT_IOU).double().mean())


def pick_box(scores: torch.Tensor) -> int:
    """The candidate a sentence picks: the highest score, the first one on a tie."""
    return int(torch.argmax(scores))


def rec_scores(targets: dict[Any, list[float]], picked: dict[Any, Optional[list[float]]], candidates: Optional[dict[Any, list[dict]]] = None) -> dict[str, Any]:
    """``acc@0.5``, ``mIoU`` over all sentences, and ``chance`` when the candidates are known.

    Args:
        targets: every sentence's referred box.
        picked: the predicted box of the sentences that have a prediction (None: no candidate to pick).
        candidates: per sentence, its candidate boxes (``{"box"}`` dicts).
    """
    ious = [box_iou_one(picked[k], box) if picked.get(k) is not None else 0.0 for k, box in targets.items()]
    total = len(targets)
    out: dict[str, Any] = {
        "acc@0.5": sum(i >= HIT_IOU for i in ious) / max(total, 1),
        "mIoU": sum(ious) / max(total, 1),
        "sentences": total,
        "predicted": sum(picked.get(k) is not None for k in targets),
    }
    if candidates is not None:
        out["chance"] = sum(hit_fraction([c["box"] for c in candidates.get(k, [])], box) for k, box in targets.items()) / max(total, 1)
        out["without_candidates"] = sum(not candidates.get(k) for k in targets)
        out["candidates_per_sentence"] = sum(len(candidates.get(k, [])) for k in targets) / max(total, 1)
    return out
