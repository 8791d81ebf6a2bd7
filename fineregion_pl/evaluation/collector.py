"""Collects a test run's region predictions on the shards' test split on every rank and turns them into ``results.json``.

The stream reads every shard exactly once over all ranks; rank 0 checks that no region came
twice (no silent deduplication) before scoring. Published protocols have their own collector:
:mod:`fineregion_pl.evaluation.protocol_collector`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.evaluation.captions import caption_metrics
from fineregion_pl.evaluation.card import shards_card
from fineregion_pl.evaluation.classification import category_from_text, classification_metrics
from fineregion_pl.evaluation.gather import check_exactly_once, gather_to_rank0
from fineregion_pl.evaluation.grounding import grounding_metrics
from fineregion_pl.evaluation.report import results_table, write_results


def answer_correct(row: dict) -> bool:
    """A generated answer is right when it is the true answer (case and outer spaces aside)."""
    return row["predicted"].strip().lower() == row["answer"].strip().lower()


class RegionTestCollector:
    """Keeps, for each evaluated region, the prediction, the references and the true category."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict] = []
        self.grounding: list[tuple[float, float]] = []
        self.spatial: list[tuple[str, str]] = []
        self.expressions: list[dict] = []  # one row per grounded expression: which region, hit, IoU
        self.vision: list[dict] = []  # one row per one-anchor question

    def add(self, batch: dict[str, Any], predictions: list[dict], grounding: list[tuple[float, float]] = (), spatial: list[tuple[str, str]] = (),
            grounding_keys: list[tuple] = (), vision: list[dict] = ()) -> None:
        """Attach references and true categories of ``batch`` to its prediction rows; keep the
        batch's grounding outcomes (with ``grounding_keys``, the ``(image_id, region_id)`` of each),
        ``(predicted, true)`` spatial answers and one-anchor question rows."""
        self.grounding += list(grounding)
        self.spatial += list(spatial)
        self.vision += list(vision)
        for (image_id, region_id), outcome in zip(grounding_keys, grounding):
            self.expressions.append({"image_id": image_id, "region_id": region_id, "hit": outcome[0], "iou": outcome[1]})
        slot = {(img, rid): (b, n) for b, (img, ids) in enumerate(zip(batch["image_ids"], batch["region_ids"])) for n, rid in enumerate(ids)}
        for row in predictions:
            b, n = slot[(row["image_id"], row["region_id"])]
            self.rows.append({**row, "references": batch["references"][b][n], "target": int(batch["categories"][b, n])})

    def gather(self) -> bool:
        """Bring all ranks' rows to rank 0 and check each region came once; returns whether this is rank 0."""
        everything = gather_to_rank0((self.rows, self.grounding, self.spatial, self.expressions, self.vision))
        if everything is None:
            return False
        self.rows, self.grounding, self.spatial, self.expressions, self.vision = ([x for part in everything for x in part[i]] for i in range(5))
        key = lambda r: (str(r["image_id"]), str(r["region_id"]))
        check_exactly_once(self.rows, key, what="region")
        self.rows.sort(key=key)
        return True

    def compute(self, categories: list[str], num_classes: int, java: bool = True) -> Optional[dict]:
        """Caption, classification, gt-ranking and spatial metrics over everything collected (rank 0 only)."""
        if not self.gather():
            return None
        rows = self.rows
        scored = [r for r in rows if r["references"]]  # captions of regions without references are not scored
        keys = [(r["image_id"], r["region_id"]) for r in scored]
        caption = caption_metrics({k: r["caption"] for k, r in zip(keys, scored)}, {k: r["references"] for k, r in zip(keys, scored)}, java=java)
        targets = [r["target"] for r in rows]
        head = classification_metrics([r["category_id"] for r in rows], targets, num_classes)
        text = classification_metrics([category_from_text(r["caption"], categories) for r in rows], targets, num_classes)
        exact = sum(r["caption"].strip().lower() in [x.strip().lower() for x in r["references"]] for r in scored)
        caption.update(exact_match=exact / max(1, len(scored)), regions=len(scored))
        return {
            "classification": {
                "accuracy": head["accuracy"],
                "macro_f1": head["macro_f1"],
                "text_accuracy": text["accuracy"],
                "text_macro_f1": text["macro_f1"],
                "regions": head["count"],
            },
            "caption": caption,
            "gt-ranking": grounding_metrics(self.grounding),
            "spatial": {
                "accuracy": sum(p.strip().lower() == t.strip().lower() for p, t in self.spatial) / max(1, len(self.spatial)),
                "questions": len(self.spatial),
            },
            **({"vision_questions": {  # only where the data has one-anchor questions (the hard benchmark)
                "accuracy": sum(answer_correct(v) for v in self.vision) / len(self.vision),
                "questions": len(self.vision),
            }} if self.vision else {}),
        }

    def write(self, results: dict, out_dir: Path, source: Optional[dict] = None, model: Optional[dict] = None, java: bool = True) -> None:
        """Write ``results.json`` (with its card when ``source`` and ``model`` are given), ``results.md``,
        ``predictions.jsonl`` and, where there are any, ``expressions.jsonl`` (each grounded
        expression's region, hit and IoU) and ``vision_questions.jsonl``; print the table."""
        if source is not None and model is not None:
            results = {"card": shards_card(source, len(self.rows), model, java), **results}
        write_results(results, out_dir, title="Test results")
        for name, rows in (("predictions.jsonl", self.rows), ("expressions.jsonl", self.expressions),
                           ("vision_questions.jsonl", [{**v, "correct": answer_correct(v)} for v in self.vision])):
            if rows or name == "predictions.jsonl":
                (Path(out_dir) / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"\n{results_table(results)}\n\nresults written to {Path(out_dir) / 'results.json'}", flush=True)  # rank 0 only: compute() returned None elsewhere

