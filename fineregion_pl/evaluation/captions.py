"""Caption metrics computed by pycocoevalcap (the COCO caption evaluation code).

CIDEr, METEOR, BLEU-4 and ROUGE-L over all reference sentences of each region. The PTB
tokenizer and METEOR run Java (a JRE must be on PATH).
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable


def caption_metrics(predictions: dict[Hashable, str], references: dict[Hashable, list[str]]) -> dict[str, float]:
    """Score one predicted caption per key against that key's reference captions.

    Args:
        predictions: ``{key: caption}``.
        references: ``{key: [reference, ...]}``; must cover every key of ``predictions``.

    Returns:
        ``{"CIDEr", "METEOR", "BLEU-4", "ROUGE-L"}`` as floats (pycocoevalcap's values).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR): install a JRE, e.g. apt-get install default-jre-headless")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"{len(missing)} prediction(s) have no references, e.g. {missing[0]!r}")
    if not predictions:
        return {"CIDEr": 0.0, "METEOR": 0.0, "BLEU-4": 0.0, "ROUGE-L": 0.0}
    keys = {k: str(i) for i, k in enumerate(predictions)}
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({keys[k]: [{"caption": predictions[k]}] for k in predictions})
    gts = tokenizer.tokenize({keys[k]: [{"caption": r} for r in references[k]] for k in predictions})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        meteor.close() if hasattr(meteor, "close") else None
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"CIDEr": float(cider), "METEOR": float(meteor_score), "BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge)}
