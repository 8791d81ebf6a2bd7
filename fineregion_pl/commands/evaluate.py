"""``fineregion-pl evaluate``: score an existing predictions file (ours or another model's) by a named protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fineregion_pl.data.protocol_data import open_protocol_run
from fineregion_pl.data.protocols import ProtocolName
from fineregion_pl.evaluation.protocol_collector import score_predictions_file
from fineregion_pl.evaluation.report import results_table, write_results


def evaluate(
    protocol: ProtocolName,
    annotations: str,
    predictions: str,
    out: Optional[str] = None,
    proposals: Optional[str] = None,
    java: bool = True,
    densecap_map: bool = False,
    boxes_scaled_to: int = 0,
    prompt: Optional[str] = None,
    decoding: Optional[str] = None,
    model_name: Optional[str] = None,
) -> dict:
    """Score a predictions file against an annotation file with the code ``fineregion-pl test`` uses.

    Reads GLaMM's, Groma's and Osprey's caption files (``[{"image_id", "caption"}]``, Osprey's string
    ids included; a folder of GLaMM's per-rank files is merged), GRiT's VG detections and COCO
    detection results (REC boxes), and this package's ``predictions.json``. Writes ``results.json``
    and ``results.md`` (results card first) to ``out``, and prints the table.

    Args:
        protocol: ``refcocog-regcap``, ``vg-regcap``, ``vg-densecap``, ``refcocog-rec`` or ``gt-ranking``.
        annotations: the protocol's annotation file, as distributed (caption-only ground truth such
            as Osprey's ``captions_refcocog_gt.json`` is enough for captions).
        predictions: the predictions file, or a folder of per-rank files.
        out: folder for ``results.json`` and ``results.md`` (default: ``evaluate-PROTOCOL/`` beside the predictions).
        proposals: ``refcocog-rec``: the candidates' COCO detection-results file (for the chance level).
        java: score with the PTB tokenizer and METEOR (Java); ``false`` scores without them (not comparable).
        densecap_map: ``vg-densecap``: also DenseCap mAP (needs Java).
        boxes_scaled_to: the longer image side the predicted boxes were written for (GRiT: 720); 0: original pixels.
        prompt: the prompt the predictions were made with, for the card.
        decoding: the decoding settings they were made with, for the card (e.g. "greedy, 512 new tokens").
        model_name: the model or checkpoint that made them, for the card.
    """
    run = open_protocol_run(protocol, annotations, proposals=proposals if protocol == "refcocog-rec" else None,
                            densecap_map=densecap_map, score_without_java=not java, with_images=False)
    model = {"lm_tokenizer": None, "prompt": prompt, "decoding": decoding, "checkpoint": model_name, "world_size": None}
    results = score_predictions_file(run, predictions, model, boxes_scaled_to)
    folder = Path(out) if out else (Path(predictions) if Path(predictions).is_dir() else Path(predictions).parent) / f"evaluate-{protocol}"
    write_results(results, folder, title=f"Scores of {Path(predictions).name}: {protocol}")
    print(f"{results_table(results)}\n\nresults written to {folder / 'results.json'} (card: {folder / 'results.md'})")
    return results
