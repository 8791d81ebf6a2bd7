"""The evaluation loops that need the model: grounding referring expressions and answering spatial questions.

Both take a :class:`~fineregion_pl.model.captioner.RegionCaptioner` and a batch it has encoded
(:meth:`~fineregion_pl.model.captioner.RegionCaptioner.encode`), so captions, grounding and
answers share one vision forward.
"""

from __future__ import annotations

from typing import Any

import torch

from fineregion_pl.evaluation.grounding import grounding_outcome
from fineregion_pl.evaluation.rec import hit_fraction
from fineregion_pl.model.captioner import EncodedBatch, RegionCaptioner, referring_targets, spatial_pairs


@torch.no_grad()
def ground_expressions(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch) -> list[tuple[float, float, float]]:
    """``(hit@0.5, IoU, chance)`` of every referring expression of the batch, its candidates being the
    annotated regions of its own image (``gt-ranking``: ranking ground-truth boxes, not REC);
    ``chance`` is the hit a uniformly random pick among those candidates would score."""
    index, prompts = encoded.index, encoded.prompts
    rows, expressions = referring_targets(batch, index, training=False)
    outcomes = []
    image_of = index[:, 0]
    real = captioner.reported_boxes(batch)[0]
    for row, expression in zip(rows, expressions):
        candidates = (image_of == image_of[row]).nonzero().flatten()
        scores = captioner.score(prompts[candidates], [expression] * len(candidates), "referring")
        b, n = index[row].tolist()
        boxes = real[image_of[candidates], index[candidates, 1]]
        outcomes.append((*grounding_outcome(scores, boxes, real[b, n]), hit_fraction(boxes.tolist(), real[b, n].tolist())))
    return outcomes


@torch.no_grad()
def answer_questions(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch) -> list[tuple[str, str]]:
    """``(predicted, true)`` answers of the batch's two-region spatial questions, generated greedily by the LM."""
    first, second, questions = spatial_pairs(batch, encoded.index)
    if not first:
        return []
    predicted = captioner.generate(captioner.question_prompts(encoded, first, second), task="question", max_new_tokens=4, num_beams=1)
    return list(zip(predicted, [q["answer"] for q in questions]))
