"""Hard-suite metrics: per-region scores read off predictions, their breakdowns, and paired bootstrap CIs.

A run's ``predictions.jsonl`` (stage 2: generated ``caption``; stage 1: the head's ``category``)
is joined with the split's ``regions.jsonl`` (:func:`fineregion_pl.data.synthetic.region_facts`) by
``(image_id, region_id)``. Each region then has 0/1 scores:

- ``region_acc``: the category head's class is the true shape;
- ``text_acc``: the shape named in the generated caption is the true shape; ``shape_acc``,
  ``colour_acc``, ``size_acc``: that attribute of the caption is right (a missing word is wrong);
  ``exact``: the whole caption equals the reference.

Breakdowns group regions by test-box IoU with the truth, visible fraction, foreign-pixel share
and size (:data:`BREAKDOWNS`). Differences between two rows are paired over (seed, region) and get
a two-level bootstrap CI: seeds resampled, then regions within each drawn seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from fineregion_pl.data.synthetic import COLOURS, SHAPES
from fineregion_pl.data.synthetic_hard import HARD_SIZES

SCORES = ("region_acc", "text_acc", "shape_acc", "colour_acc", "size_acc", "exact")
BREAKDOWNS = {
    "box_iou": [(0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.95), (0.95, 1.01)],
    "visible_fraction": [(0.0, 0.6), (0.6, 0.8), (0.8, 1.01)],
    "foreign_share": [(0.0, 0.1), (0.1, 0.3), (0.3, 1.01)],
    "size": list(HARD_SIZES),
}


def _word(text: str, vocabulary: Iterable[str]) -> Optional[str]:
    words = re.sub(r"[^a-z ]+", " ", text.lower()).split()
    return next((w for w in words if w in set(vocabulary)), None)


def parse_caption(caption: str) -> dict[str, Optional[str]]:
    """The shape, colour and size words of a generated caption (``None`` where absent) and
    whether it says ``partly hidden``."""
    return {"shape": _word(caption, SHAPES), "colour": _word(caption, COLOURS), "size": _word(caption, HARD_SIZES),
            "hidden": "partly hidden" in caption.lower()}


def region_scores(prediction: dict, facts: dict) -> dict[str, float]:
    """The 0/1 scores of one region (see the module docstring); caption scores only when the
    prediction has a caption, ``region_acc`` only when it has a category."""
    out: dict[str, float] = {}
    if prediction.get("category") is not None:
        out["region_acc"] = float(prediction["category"] == facts["category"])
    caption = prediction.get("caption")
    if caption is not None:
        parsed = parse_caption(caption)
        out.update(text_acc=float(parsed["shape"] == facts["category"]), shape_acc=float(parsed["shape"] == facts["category"]),
                   colour_acc=float(parsed["colour"] == facts.get("colour")), size_acc=float(parsed["size"] == facts.get("size")))
        references = prediction.get("references") or []
        out["exact"] = float(caption.strip().lower() in [r.strip().lower() for r in references])
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _facts_by_key(facts: Path) -> dict[tuple[str, int], dict]:
    return {(str(f["image_id"]), int(f["region_id"])): f for f in read_jsonl(facts)}


def scored_regions(predictions: Path, facts: Path) -> dict[tuple[str, int], dict]:
    """``{(image_id, region_id): facts + scores}`` for every annotated region (proposals and
    regions without a category are left out) of one run on one split."""
    by_key = {key: f for key, f in _facts_by_key(facts).items() if f.get("category")}
    out = {}
    for row in read_jsonl(predictions):
        key = (str(row["image_id"]), int(row["region_id"]))
        if key in by_key:
            out[key] = {**by_key[key], **region_scores(row, by_key[key])}
    missing = len(by_key) - len(out)
    if missing:
        raise ValueError(f"{predictions}: {missing} of {len(by_key)} regions of {facts} have no prediction")
    return out


def scored_expressions(expressions: Path, facts: Path) -> dict[tuple[str, int], dict]:
    """``{(image_id, region_id): facts + {"ranking_acc": hit}}`` of every grounded expression of one
    run on one split (``expressions.jsonl`` of ``test``), joined with the split's ``regions.jsonl``
    (its ``expression_kind`` says which are relational)."""
    by_key = _facts_by_key(facts)
    out = {}
    for row in read_jsonl(expressions):
        key = (str(row["image_id"]), int(row["region_id"]))
        out[key] = {**by_key.get(key, {}), "ranking_acc": float(row["hit"])}
    return out


def scored_vision_questions(path: Path) -> dict[tuple[str, str], dict]:
    """``{(image_id, question): {"vision_acc": correct, "answer": true answer}}`` of one run's ``vision_questions.jsonl``."""
    return {(str(r["image_id"]), r["question"]): {"vision_acc": float(r["correct"]), "answer": r["answer"]} for r in read_jsonl(path)}


def bin_of(value, bins) -> Optional[str]:
    """The label of the bin ``value`` falls in (``"0.5-0.6"``; a name for categorical bins)."""
    for b in bins:
        if isinstance(b, str):
            if value == b:
                return b
        elif b[0] <= value < b[1]:
            return f"{b[0]:g}-{min(b[1], 1.0):g}"
    return None


def breakdown(regions: Iterable[dict], score: str) -> dict[str, dict[str, tuple[float, int]]]:
    """Per breakdown and bin: mean of ``score`` and the number of regions."""
    regions = [r for r in regions if score in r]
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for name, bins in BREAKDOWNS.items():
        groups: dict[str, list[float]] = {}
        for r in regions:
            label = bin_of(r.get(name), bins) if r.get(name) is not None else None
            if label is not None:
                groups.setdefault(label, []).append(r[score])
        out[name] = {label: (float(np.mean(v)), len(v)) for label, v in groups.items()}
    return out


def paired_bootstrap(row: dict[int, dict], full: dict[int, dict], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean difference ``row - full`` and its 95% percentile bootstrap CI, paired over seeds and regions.

    Args:
        row, full: ``{seed: {region_key: score}}``; only seeds in both, and within a seed only
            regions in both, are paired.
        resamples: bootstrap draws; each draws seeds with replacement, then regions with
            replacement within each drawn seed.
    """
    seeds = sorted(set(row) & set(full))
    if not seeds:
        raise ValueError("paired_bootstrap: the two rows share no seed")
    diffs = []
    for s in seeds:
        keys = sorted(set(row[s]) & set(full[s]))
        diffs.append(np.array([row[s][k] - full[s][k] for k in keys], dtype=np.float64))
    estimate = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        picked = rng.integers(0, len(diffs), len(diffs))
        draws[i] = np.mean([diffs[p][rng.integers(0, len(diffs[p]), len(diffs[p]))].mean() for p in picked])
    low, high = np.percentile(draws, [2.5, 97.5])
    return estimate, float(low), float(high)
