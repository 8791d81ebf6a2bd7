"""Caption scores as the region-captioning papers' code computes them: pycocoevalcap's ``COCOEvalCap``.

GLaMM, Groma, ControlCap and DynRefer all score with ``COCOEvalCap``: the ground truth and the
results go into ``pycocotools`` ``COCO`` objects (``loadRes``), only the ids that have a result
are scored (``params['image_id'] = results.getImgIds()``), both sides go through the PTB tokenizer
(Stanford CoreNLP, run with ``java``), then BLEU-1..4, METEOR 1.5 (``java``), ROUGE-L and CIDEr
(its IDF over the scored set only). :func:`coco_caption_scores` does exactly that; SPICE, the last
scorer of ``COCOEvalCap.evaluate``, is off by default because it downloads Stanford CoreNLP models
on first use (the papers' region-captioning tables print METEOR and CIDEr).

Without Java, scoring stops with a one-line error, unless ``java=False``: then a Python tokenizer
stands in for PTB and METEOR is left out, and the numbers are labelled not comparable.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Hashable
from typing import Any

from fineregion_pl.model.errors import FineRegionError

PTB_TOKENIZER = "PTBTokenizer (Stanford CoreNLP 3.4.1 via java, -lowerCase, punctuation dropped; pycocoevalcap 1.2)"
PYTHON_TOKENIZER = "Python regex tokenizer (lower-cased, pycocoevalcap's punctuation list dropped): NOT the PTB tokenizer"
NO_JAVA_NOTE = "scored without Java: no PTB tokenizer, no METEOR; not comparable with published numbers"


class MissingJavaError(FineRegionError, RuntimeError):
    """Java is needed (PTB tokenizer, METEOR) and none is on PATH."""


def require_java() -> None:
    """Raise :class:`MissingJavaError` with what to do when ``java`` is not on PATH."""
    if shutil.which("java") is None:
        raise MissingJavaError(
            "caption scoring needs Java (pycocoevalcap's PTB tokenizer and METEOR run `java`) and none is on PATH: "
            "install a JRE (apt-get install default-jre-headless), or score without it (--data.score_without_java true, "
            "`evaluate --java false`: no METEOR, numbers not comparable with published ones)"
        )


def coco_objects(references: dict[Hashable, list[str]], predictions: dict[Hashable, str]) -> tuple[Any, Any]:
    """``(ground truth, results)`` as pycocotools ``COCO`` objects, the way the papers' scripts load them."""
    from pycocotools.coco import COCO

    gt = COCO()
    annotations = [{"id": n, "image_id": key, "caption": text} for n, (key, text) in enumerate((k, t) for k, texts in references.items() for t in texts)]
    gt.dataset = {"images": [{"id": key} for key in references], "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = gt.loadRes([{"image_id": key, "caption": text} for key, text in predictions.items()])
    return gt, results


def _python_tokenize(captions: dict[Hashable, list[dict]]) -> dict[Hashable, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    out = {}
    for key, entries in captions.items():
        out[key] = [" ".join(t for t in re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]+", e["caption"].replace("\n", " ").lower()) if t not in PUNCTUATIONS) for e in entries]
    return out


def coco_caption_scores(references: dict[Hashable, list[str]], predictions: dict[Hashable, str], java: bool = True, spice: bool = False) -> dict[str, float]:
    """``COCOEvalCap`` scores of ``predictions`` (one caption per id) against ``references``.

    Args:
        references: ``{id: [reference, ...]}``; every predicted id must be there.
        predictions: ``{id: caption}``; only these ids are scored (as GLaMM's and Groma's scripts do).
        java: use the PTB tokenizer and METEOR (Java); ``False`` scores without them (not comparable).
        spice: also SPICE (downloads Stanford CoreNLP models on first use).

    Returns:
        ``{"Bleu_1", ..., "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`` (``COCOEvalCap.eval``'s names and
        values, 0-1 scale; papers print them x 100), ``METEOR`` absent without Java, ``SPICE`` with it.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if java:
        require_java()
    if not predictions:
        return {}
    gt, results = coco_objects(references, predictions)
    ids = results.getImgIds()
    gts = {i: gt.imgToAnns[i] for i in ids}
    res = {i: results.imgToAnns[i] for i in ids}
    tokenize = PTBTokenizer().tokenize if java else _python_tokenize
    gts, res = tokenize(gts), tokenize(res)
    scorers: list[tuple[Any, Any]] = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if java:
        scorers.append((Meteor(), "METEOR"))
    scorers += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    scores: dict[str, float] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its counts
            value, _ = scorer.compute_score(gts, res)
        for name, v in zip(names, value) if isinstance(names, list) else [(names, value)]:
            scores[name] = float(v)
    return scores
