"""Our scores equal the reference code's: COCOEvalCap called as GLaMM's evaluate.py calls it, DenseCap AP on hand-built cases."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import EVAL, GLAMM_REFCOCOG, GLAMM_RESULTS, need_eval_fixtures

from fineregion_pl.commands.evaluate import evaluate
from fineregion_pl.evaluation.densecap import densecap_map

ROOT = Path(__file__).resolve().parents[2]


class NoSpice:
    """SPICE cannot run here: it downloads Stanford CoreNLP models on first use (no network)."""

    def method(self):
        return "SPICE"

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


def glamm_evaluate_py(annotation_file: Path, results_dir: Path) -> dict[str, float]:
    """groundingLMM eval/region_captioning/evaluate.py's steps: merge every result file, loadRes, score the predicted ids."""
    import pycocoevalcap.eval as coco_eval_module
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    coco = COCO(str(annotation_file))
    all_results = []
    for result_file in sorted(os.listdir(results_dir)):
        all_results += json.loads((results_dir / result_file).read_text())
    coco_result = coco.loadRes(copy.deepcopy(all_results))
    coco_eval = COCOEvalCap(coco, coco_result)
    coco_eval.params["image_id"] = coco_result.getImgIds()
    saved, coco_eval_module.Spice = coco_eval_module.Spice, NoSpice
    try:
        coco_eval.evaluate()
    finally:
        coco_eval_module.Spice = saved
    return {k: float(v) for k, v in coco_eval.eval.items() if k != "SPICE"}


@pytest.mark.slow
def test_evaluate_on_glamm_outputs_equals_cocoevalcap_called_as_glamm_calls_it(tmp_path):
    need_eval_fixtures()
    done = subprocess.run([sys.executable, "-m", "fineregion_pl", "evaluate", "refcocog-regcap", str(GLAMM_REFCOCOG), str(GLAMM_RESULTS), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads((tmp_path / "results.json").read_text())
    reference = glamm_evaluate_py(GLAMM_REFCOCOG, GLAMM_RESULTS)
    assert set(reference) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for metric, value in reference.items():
        assert ours["refcocog-regcap"][metric] == value, metric  # exactly: same tokenizer, scorers, ids and order
    card = ours["card"]
    assert card["metric_tokenizer"].startswith("PTBTokenizer") and card["items"]["scored"] == 6
    # scored the way published numbers are; only the fixture's size (6 of RefCOCOg val's 4,896 sentences) makes it not comparable
    assert card["not_comparable_because"] == ["the file has 6 sentences, the published set 4896 (RefCOCOg umd val sentences as commonly reported; recalled, not checked against GLaMM's file)"]
    assert card["predictions"]["files"] == ["GLaMM-RegCap-RefCOCOg_refcocog_0.json"]
    # the numbers carry the versions of the libraries that can move them
    from importlib.metadata import version

    assert card["code_version"]["libraries"]["torch"] == version("torch") and card["code_version"]["libraries"]["pillow"] == version("pillow")
    assert "| refcocog-regcap | CIDEr |" in done.stdout


def test_densecap_ap_on_hand_built_cases():
    exact = lambda refs, cands: [1.0 if cands[k][0] in refs[k] else 0.0 for k in refs]  # METEOR stand-in: 1 for a reference's words, else 0
    truth = {1: [{"box": [0, 0, 10, 10], "captions": ["a red car"]}, {"box": [50, 50, 60, 60], "captions": ["a dog"]}, {"box": [0, 50, 10, 60], "captions": ["a tree"]}]}
    found = {1: [{"box": [0, 0, 10, 10], "caption": "a red car", "score": 0.9}]}
    scores = densecap_map(truth, found, exact)
    assert scores["ground_truth_boxes"] == 3 and scores["detections"] == 1
    assert scores["mAP"] == pytest.approx(0.34) and scores["detection_mAP"] == pytest.approx(0.34)  # recall 1/3: recall points 0..0.33 at precision 1
    wrong_words = {1: [{"box": [0, 0, 10, 10], "caption": "a blue bus", "score": 0.9}]}
    assert densecap_map(truth, wrong_words, exact)["mAP"] == 0.0 and densecap_map(truth, wrong_words, exact)["detection_mAP"] == pytest.approx(0.34)
    # two boxes with IoU >= 0.7 are one ground-truth box with both captions; a second detection of it is a false positive
    merged = {1: [{"box": [0, 0, 10, 10], "captions": ["a red car"]}, {"box": [0, 0, 10, 11], "captions": ["the car"]}]}
    twice = {1: [{"box": [0, 0, 10, 10], "caption": "the car", "score": 0.9}, {"box": [0, 0, 10, 10], "caption": "a red car", "score": 0.5}]}
    scores = densecap_map(merged, twice, exact)
    assert scores["ground_truth_boxes"] == 1 and scores["mAP"] == pytest.approx(1.0)  # the first detection already reaches recall 1


@pytest.mark.slow
def test_grit_outputs_need_their_720_frame_undone(tmp_path):
    need_eval_fixtures()
    grit = EVAL / "vg_regcap"
    args = ("vg-densecap", str(grit / "grit_test.json"), str(grit / "grit_vg_instances_results.sample.json"))
    undone = evaluate(*args, out=str(tmp_path / "a"), densecap_map=True, boxes_scaled_to=720)["vg-densecap"]
    as_is = evaluate(*args, out=str(tmp_path / "b"), densecap_map=True)["vg-densecap"]
    assert undone["detections"] == as_is["detections"] == 6 and undone["ground_truth_boxes"] == 7  # 8 regions, one pair merged (IoU >= 0.7)
    assert undone["detection_mAP"] > as_is["detection_mAP"] and undone["mAP"] > as_is["mAP"]
