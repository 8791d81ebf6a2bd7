"""Region classification metrics (torchmetrics) and category names read off generated text."""

from __future__ import annotations

import re

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def category_from_text(text: str, categories: list[str]) -> int:
    """Index of the category named in ``text`` (longest name first, whole words), or -1."""
    lowered = f" {re.sub(r'[^a-z0-9 ]+', ' ', text.lower())} "
    for index in sorted(range(len(categories)), key=lambda i: -len(categories[i])):
        if f" {categories[index].lower()} " in lowered:
            return index
    return -1


def classification_metrics(predicted: list[int], target: list[int], num_classes: int) -> dict[str, float]:
    """``accuracy`` (micro) and ``macro_f1`` over regions with a known target (``target >= 0``).

    A prediction of -1 (no category found in the text) counts as wrong: it is scored as an extra
    "none" class, and ``macro_f1`` averages torchmetrics' per-class F1 over the real classes that
    occur in the targets or the predictions.
    """
    pairs = [(p, t) for p, t in zip(predicted, target) if t >= 0]
    if not pairs:
        return {"accuracy": 0.0, "macro_f1": 0.0, "count": 0}
    none = num_classes
    pred = torch.tensor([p if p >= 0 else none for p, _ in pairs])
    true = torch.tensor([t for _, t in pairs])
    per_class = multiclass_f1_score(pred, true, num_classes + 1, average=None)[:num_classes]
    present = torch.zeros(num_classes, dtype=torch.bool)
    present[true] = True
    present[pred[pred < none]] = True
    return {
        "accuracy": float(multiclass_accuracy(pred, true, num_classes + 1, average="micro")),
        "macro_f1": float(per_class[present].mean()),
        "count": len(pairs),
    }
