"""Referring expression comprehension: pick the candidate region whose prompt makes the expression most likely.

As in the generation-comprehension approach of the original RefCOCOg work (Mao et al., 2016): for
an expression ``e`` and the candidate regions ``c`` of its image, the prediction is
``argmax_c log p(e | region c)``. Ties share the credit: when ``k`` candidates tie for the best
score, each counts ``1/k`` (so the result never depends on the candidates' order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fineregion_pl.model.boxes import matched_box_iou


def grounding_outcome(scores: Tensor, candidate_boxes: Tensor, target_box: Tensor, atol: float = 1e-6) -> tuple[float, float]:
    """``(hit@0.5, IoU)`` of one expression, averaged over tied best candidates.

    Args:
        scores: ``(C,)`` log-likelihood of the expression for each candidate.
        candidate_boxes: ``(C, 4)`` xyxy.
        target_box: ``(4,)`` the referred region's box.
    """
    best = scores.max()
    tied = (scores >= best - atol).nonzero().flatten()
    ious = matched_box_iou(candidate_boxes[tied].float(), target_box.float().expand(len(tied), 4))
    return float((ious >= 0.5).float().mean()), float(ious.mean())


def grounding_outcomes(scores: Tensor, segments: Tensor, candidate_boxes: Tensor, target_boxes: Tensor, atol: float = 1e-6) -> list[tuple[float, float, float]]:
    """:func:`grounding_outcome` of many expressions at once, with ``chance`` (the share of an
    expression's candidates that are hits: what a uniformly random pick scores).

    Args:
        scores: ``(P,)`` the log-likelihood of each (expression, candidate) pair.
        segments: ``(P,)`` the expression of each pair, ``0..E-1``, every expression with at least one.
        candidate_boxes: ``(P, 4)`` xyxy, each pair's candidate box.
        target_boxes: ``(E, 4)`` xyxy, each expression's referred box.

    Returns:
        per expression ``(hit@0.5, IoU, chance)``: the first two as :func:`grounding_outcome`
        (float32 IoUs, averaged over tied best candidates), ``chance`` from float64 IoUs.
    """
    count = int(target_boxes.shape[0])
    best = torch.full((count,), float("-inf"), dtype=scores.dtype).scatter_reduce(0, segments, scores, "amax")
    tied = scores >= best[segments] - atol
    targets = target_boxes[segments]
    ious = matched_box_iou(candidate_boxes.float(), targets.float())
    ties = torch.zeros(count).index_add(0, segments, tied.float())
    hits = torch.zeros(count).index_add(0, segments, (tied & (ious >= 0.5)).float()) / ties
    mean_iou = torch.zeros(count).index_add(0, segments, torch.where(tied, ious, 0.0)) / ties
    candidates = torch.bincount(segments, minlength=count).double()
    chance = torch.zeros(count, dtype=torch.float64).index_add(
        0, segments, (matched_box_iou(candidate_boxes.double(), targets.double()) >= 0.5).double()) / candidates
    return list(zip(hits.tolist(), mean_iou.tolist(), chance.tolist()))


def grounding_metrics(outcomes: list[tuple[float, ...]]) -> dict[str, float]:
    """``acc@0.5`` and ``mIoU`` over expressions' outcomes ``(hit, IoU)`` from :func:`grounding_outcome`,
    and ``chance`` when the outcomes carry a third value (the hit a random pick would score)."""
    if not outcomes:
        return {"acc@0.5": 0.0, "mIoU": 0.0, "expressions": 0}
    hits = torch.tensor([o[0] for o in outcomes], dtype=torch.float64)
    ious = torch.tensor([o[1] for o in outcomes], dtype=torch.float64)
    out = {"acc@0.5": float(hits.mean()), "mIoU": float(ious.mean()), "expressions": len(outcomes)}
    if all(len(o) > 2 for o in outcomes):
        out["chance"] = float(torch.tensor([o[2] for o in outcomes], dtype=torch.float64).mean())
    return out
