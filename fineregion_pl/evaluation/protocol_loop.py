"""What the model does for a protocol's batch: a caption per box, or a box per sentence.

The rows are the predictions file's entries (COCO results, boxes ``[x, y, w, h]`` in original
pixels), so ``fineregion-pl evaluate`` scores a test run's ``predictions.json`` exactly as the
test did.
"""

from __future__ import annotations

from typing import Any

import torch

from fineregion_pl.evaluation.rec import pick_box
from fineregion_pl.model.captioner import EncodedBatch, RegionCaptioner


def xywh(box: list[float]) -> list[float]:
    """``xyxy`` -> COCO ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def score_in_chunks(captioner: RegionCaptioner, prompts: torch.Tensor, texts: list[str], task: str) -> torch.Tensor:
    """:meth:`RegionCaptioner.score` over ``generation_batch_size`` rows at a time: a batch of
    sentences times a detector's proposals can be thousands of rows, whose logits would not fit at once."""
    step = captioner.config.generation_batch_size
    if not texts:
        return torch.zeros(0)
    return torch.cat([captioner.score(prompts[i : i + step], texts[i : i + step], task).float().cpu() for i in range(0, len(texts), step)])


def score_shared_in_chunks(captioner: RegionCaptioner, prompts: torch.Tensor, texts: list[str], owners: list[int], task: str) -> torch.Tensor:
    """``score_in_chunks(captioner, prompts[owners], texts, task)`` where many texts share a prompt:
    :meth:`RegionCaptioner.score_shared` over ``generation_batch_size`` texts at a time, each chunk
    with the prompts its texts use, each computed once."""
    step = captioner.config.generation_batch_size
    if not texts:
        return torch.zeros(0)
    out = []
    for i in range(0, len(texts), step):
        chunk = owners[i : i + step]
        used = sorted(set(chunk))
        local = {r: k for k, r in enumerate(used)}
        rows = torch.as_tensor(used, device=prompts.device)
        out.append(captioner.score_shared(prompts[rows], texts[i : i + step], [local[r] for r in chunk], task).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def protocol_rows(captioner: RegionCaptioner, batch: dict[str, Any], encoded: EncodedBatch, task: str, score_captions: bool = False) -> list[dict]:
    """Prediction rows of a :func:`~fineregion_pl.data.protocol_data.collate_protocol` batch.

    - ``regcap``: ``{"image_id", "caption"}`` per item (GLaMM's results format);
    - ``densecap``: ``{"image_id", "region_id", "bbox", "caption", "score"}`` per box; ``score`` is the
      caption's log-likelihood (with ``score_captions``; DenseCap AP ranks by it), else 0;
    - ``rec`` / ``gt-ranking``: ``{"image_id", "bbox", "score", "candidate", "candidates"}`` per
      sentence: the candidate whose region prompt makes the sentence most likely (none: no ``bbox``).
    """
    items = batch["protocol_items"]
    if task in ("regcap", "densecap"):
        rows = captioner.describe_batch(batch, encoded)
        if task == "regcap":
            return [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows]
        scores = score_in_chunks(captioner, encoded.prompts, [r["caption"] for r in rows], "caption").tolist() if score_captions and rows else [0.0] * len(rows)
        original = {(item["id"], rid): box for item in items for rid, box in zip(item["region_ids"], item["boxes"])}
        return [{"image_id": r["image_id"], "region_id": r["region_id"], "bbox": xywh(original[r["image_id"], r["region_id"]]), "caption": r["caption"], "score": float(s)}
                for r, s in zip(rows, scores)]
    image_of = encoded.index[:, 0]
    per_item = [(image_of == b).nonzero().flatten() for b in range(len(items))]
    flat = torch.cat(per_item) if per_item else image_of.new_zeros(0)
    sentences = [items[b]["expression"] for b, rows in enumerate(per_item) for _ in range(len(rows))]
    scores = score_in_chunks(captioner, encoded.prompts[flat], sentences, "referring")
    out, start = [], 0
    for b, rows in enumerate(per_item):
        row: dict[str, Any] = {"image_id": items[b]["id"], "candidates": len(rows)}
        if len(rows):
            best = pick_box(scores[start : start + len(rows)])
            n = int(encoded.index[rows[best], 1])
            row.update(bbox=xywh(items[b]["boxes"][n]), score=float(scores[start + best]), candidate=n)
        out.append(row)
        start += len(rows)
    return out
