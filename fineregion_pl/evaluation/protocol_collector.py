"""Collects a protocol test run's predictions on every rank, merges them on rank 0 and scores the merged file.

Rank 0 checks that every item of the annotation file was evaluated exactly once (never
deduplicated: a repeat is a bug in the split and stops the run), writes ``predictions.json`` in
the COCO results format the papers' scripts read, and scores that file with the same readers and
scorers ``fineregion-pl evaluate`` uses, so the two always agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.data.annotations import file_sha256
from fineregion_pl.data.protocol_data import ProtocolRun
from fineregion_pl.evaluation.card import protocol_card
from fineregion_pl.evaluation.gather import check_exactly_once, gather_to_rank0
from fineregion_pl.evaluation.prediction_files import read_box_predictions, read_caption_predictions, read_dense_predictions
from fineregion_pl.evaluation.protocol_scores import score_run
from fineregion_pl.evaluation.report import results_table, write_results

PREDICTIONS = "predictions.json"


def read_predictions(run: ProtocolRun, path: str | Path, boxes_scaled_to: int = 0) -> tuple[Any, list[Path]]:
    """A predictions file (or folder) read for ``run``'s task: captions by id, detections by image, or boxes by id."""
    task = run.protocol.task
    if task == "regcap":
        return read_caption_predictions(path, run.annotations)
    if task == "densecap":
        return read_dense_predictions(path, run.annotations, boxes_scaled_to)
    return read_box_predictions(path, run.annotations)


def score_predictions_file(run: ProtocolRun, path: str | Path, model: Optional[dict] = None, boxes_scaled_to: int = 0) -> dict[str, Any]:
    """``{"card": ..., <protocol name>: scores}`` of a predictions file (or folder of per-rank files)."""
    predictions, files = read_predictions(run, path, boxes_scaled_to)
    scores = score_run(run, predictions)
    scored = len(predictions) if run.protocol.task != "densecap" else sum(1 for item in run.annotations.items if item.id in predictions)
    info = {"files": [f.name for f in files], "sha256": [file_sha256(f) for f in files]}
    if boxes_scaled_to:
        info["boxes_scaled_to"] = boxes_scaled_to
    return {"card": protocol_card(run, scored, model, info), run.protocol.name: scores}


class ProtocolCollector:
    """Keeps this rank's prediction rows of a protocol run."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def reset(self) -> None:
        self.rows = []

    def add(self, rows: list[dict]) -> None:
        self.rows += rows

    def finish(self, run: ProtocolRun, out_dir: Path, model: dict) -> Optional[dict]:
        """Merge on rank 0, check coverage, write ``predictions.json``, ``results.json``, ``results.md``; None on other ranks."""
        everything = gather_to_rank0(self.rows)
        if everything is None:
            return None
        rows = [r for part in everything for r in part]
        order = {item.id: n for n, item in enumerate(run.annotations.items)}
        if run.protocol.task == "densecap":
            expected = [(item.id, rid) for item in run.annotations.items for rid in _region_ids(run, item)]
            check_exactly_once(rows, lambda r: (r["image_id"], r["region_id"]), expected, "region")
        else:
            check_exactly_once(rows, lambda r: r["image_id"], order, run.protocol.unit.rstrip("s"))
        rows.sort(key=lambda r: (order[r["image_id"]], str(r.get("region_id", ""))))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if run.protocol.task in ("rec", "gt-ranking"):
            rows = [{"bbox": None, **r} for r in rows]  # a sentence without candidates: evaluated, no box
        (out_dir / PREDICTIONS).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        results = score_predictions_file(run, out_dir / PREDICTIONS, model)
        results["card"]["predictions"]["files"] = [str(out_dir / PREDICTIONS)]
        results["card"]["rows_per_rank"] = [len(part) for part in everything]  # each rank's share: no rank idle, none padded
        write_results(results, out_dir, title=f"Test results: {run.protocol.name}")
        print(f"\n{results_table(results)}\n\nresults written to {out_dir / 'results.json'} (card: {out_dir / 'results.md'})", flush=True)
        return results


def _region_ids(run: ProtocolRun, item) -> list:
    if run.candidates is not None:
        return [f"c{n}" for n in range(len(run.candidates[item.id]))]
    return [r["id"] for r in item.regions]
