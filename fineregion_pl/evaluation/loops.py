"""The evaluation loops that need the model: grounding referring expressions and answering questions.

Both take a :class:`~fineregion_pl.model.captioner.RegionCaptioner` and a batch it has encoded
(:meth:`~fineregion_pl.model.captioner.RegionCaptioner.encode`), so captions, grounding and
answers share one vision forward.
"""

from __future__ import annotations

from typing import Any

import torch

from fineregion_pl.evaluation.grounding import grounding_outcome, grounding_outcomes
from fineregion_pl.evaluation.protocol_loop import score_shared_in_chunks
from fineregion_pl.evaluation.rec import hit_fraction
from fineregion_pl.model.captioner import EncodedBatch, RegionCaptioner, referring_targets, spatial_pairs, vision_question_groups
from fineregion_pl.model.language_model import vision_question_task


@torch.no_grad()
def ground_expressions(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch) -> list[tuple[float, float, float]]:
    """``(hit@0.5, IoU, chance)`` of every referring expression of the batch, its candidates being the
    annotated regions of its own image (``gt-ranking``: ranking ground-truth boxes, not REC);
    ``chance`` is the hit a uniformly random pick among those candidates would score.

    Every candidate of every expression is scored in one LM call (in chunks of
    ``generation_batch_size`` pairs), each region's context computed once for all the expressions
    it is a candidate of; the same numbers as :func:`ground_expressions_one_by_one`.
    """
    index = encoded.index
    rows, expressions = referring_targets(batch, index, training=False)
    image_of = index[:, 0]
    candidates = [(image_of == image_of[row]).nonzero().flatten() for row in rows]
    if not rows:
        return []
    flat = torch.cat(candidates)
    owners = flat.tolist()
    texts = [e for e, c in zip(expressions, candidates) for _ in range(len(c))]
    scores = score_shared_in_chunks(captioner, encoded.prompts, texts, owners, "referring")
    real = captioner.reported_boxes(batch)[0]
    referred = index[torch.tensor(rows, device=index.device)]
    segments = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(c) for c in candidates]))
    return grounding_outcomes(scores, segments, real[image_of[flat], index[flat, 1]].cpu(), real[referred[:, 0], referred[:, 1]].cpu())


@torch.no_grad()
def ground_expressions_one_by_one(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch) -> list[tuple[float, float, float]]:
    """:func:`ground_expressions` with one LM call per expression (the loop it replaced; the
    reference its test and ``benchmarks/bench_evaluation.py`` compare it with)."""
    index, prompts = encoded.index, encoded.prompts
    rows, expressions = referring_targets(batch, index, training=False)
    image_of = index[:, 0]
    real = captioner.reported_boxes(batch)[0]
    outcomes = []
    for row, expression in zip(rows, expressions):
        candidates = (image_of == image_of[row]).nonzero().flatten()
        scores = captioner.score(prompts[candidates], [expression] * len(candidates), "referring")
        outcomes.append(_outcome(index, image_of, real, row, candidates, scores))
    return outcomes


def _outcome(index, image_of, real, row: int, candidates, scores) -> tuple[float, float, float]:
    b, n = index[row].tolist()
    boxes = real[image_of[candidates], index[candidates, 1]]
    return (*grounding_outcome(scores, boxes, real[b, n]), hit_fraction(boxes.tolist(), real[b, n].tolist()))


@torch.no_grad()
def answer_questions(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch) -> list[tuple[str, str]]:
    """``(predicted, true)`` answers of the batch's two-region spatial questions, generated greedily by the LM."""
    first, second, questions = spatial_pairs(batch, encoded.index)
    if not first:
        return []
    predicted = captioner.generate(captioner.question_prompts(encoded, first, second), task="question", max_new_tokens=4, num_beams=1)
    return list(zip(predicted, [q["answer"] for q in questions]))


def grounding_keys(batch: dict[str, Any], encoded: EncodedBatch) -> list[tuple[Any, Any]]:
    """``(image_id, region_id)`` of the region each outcome of :func:`ground_expressions` refers
    to, in the same order (per-expression results can then be joined with the data's facts)."""
    rows, _ = referring_targets(batch, encoded.index, training=False)
    return [(batch["image_ids"][b], batch["region_ids"][b][n]) for b, n in encoded.index[rows].tolist()] if rows else []


@torch.no_grad()
def answer_vision_questions(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch) -> list[dict]:
    """Greedy answers to the batch's one-anchor questions (``"what is left of the red square?"``),
    one LM call per relation present: rows of ``image_id``, ``region_id`` (the anchor),
    ``question``, ``predicted``, ``answer``."""
    image_ids, region_ids = batch["image_ids"], batch["region_ids"]
    out = []
    for relation, (rows, questions) in vision_question_groups(batch, encoded.index, captioner.config.language_model.relations).items():
        predicted = captioner.generate(encoded.prompts[rows], task=vision_question_task(relation), max_new_tokens=4, num_beams=1)
        for (b, n), q, text in zip(encoded.index[rows].tolist(), questions, predicted):
            out.append({"image_id": image_ids[b], "region_id": region_ids[b][n], "question": q["question"], "predicted": text, "answer": q["answer"]})
    return out
