"""Caption metrics of the shards' test split (every reference sentence of each region), through :mod:`fineregion_pl.evaluation.coco_caption`.

CIDEr, METEOR, BLEU-4 and ROUGE-L as ``COCOEvalCap`` computes them. The PTB tokenizer and METEOR
run Java (a JRE must be on PATH, unless ``java=False``).
"""

from __future__ import annotations

from collections.abc import Hashable

from fineregion_pl.evaluation.coco_caption import coco_caption_scores


def caption_metrics(predictions: dict[Hashable, str], references: dict[Hashable, list[str]], java: bool = True) -> dict[str, float]:
    """Score one predicted caption per key against that key's reference captions.

    Args:
        predictions: ``{key: caption}``.
        references: ``{key: [reference, ...]}``; must cover every key of ``predictions``.
        java: PTB tokenizer and METEOR (see :func:`~fineregion_pl.evaluation.coco_caption.coco_caption_scores`).

    Returns:
        ``{"CIDEr", "METEOR", "BLEU-4", "ROUGE-L"}`` as floats (pycocoevalcap's values; no METEOR without Java).
    """
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"{len(missing)} prediction(s) have no references, e.g. {missing[0]!r}")
    if not predictions:
        return {"CIDEr": 0.0, "METEOR": 0.0, "BLEU-4": 0.0, "ROUGE-L": 0.0}
    number = {k: i for i, k in enumerate(predictions)}
    scores = coco_caption_scores({number[k]: references[k] for k in predictions}, {number[k]: v for k, v in predictions.items()}, java=java)
    names = {"CIDEr": "CIDEr", "METEOR": "METEOR", "BLEU-4": "Bleu_4", "ROUGE-L": "ROUGE_L"}
    return {ours: scores[theirs] for ours, theirs in names.items() if theirs in scores}
