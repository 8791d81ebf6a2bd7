"""The named protocols end to end on their published-format fixtures, the readers of each variant, REC and gt-ranking scores."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from eval_fixtures import EVAL, GLAMM_REFCOCOG, MDETR_REC, PROPOSALS, images_for, need_eval_fixtures, run_test

from fineregion_pl.commands.evaluate import evaluate
from fineregion_pl.data.annotations import read_annotations
from fineregion_pl.data.protocol_data import ProtocolRun, ProtocolStream, open_protocol_run
from fineregion_pl.data.protocols import PROTOCOLS
from fineregion_pl.evaluation.coco_caption import MissingJavaError
from fineregion_pl.evaluation.rec import box_iou_one, pick_box, rec_scores

CASES = {
    "refcocog-regcap": (GLAMM_REFCOCOG, None, 6),
    "vg-regcap": (EVAL / "vg_regcap" / "test_caption.json", None, 6),
    "vg-densecap": (EVAL / "vg_regcap" / "grit_test.json", None, 3),
    "refcocog-rec": (MDETR_REC, PROPOSALS, 6),
    "gt-ranking": (MDETR_REC, None, 6),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("protocol", list(CASES))
def test_each_protocol_runs_on_its_fixture_and_its_card_names_the_file(protocol, stage1_checkpoint, tiny_lm, stage2_checkpoint, tmp_path):
    need_eval_fixtures()
    annotation, proposals, items = CASES[protocol]
    images = images_for(annotation, tmp_path / "images")
    out = tmp_path / "run"
    results = run_test(stage1_checkpoint, tiny_lm, stage2_checkpoint, out, protocol=protocol, annotations=str(annotation),
                       images=str(images), proposals=str(proposals) if proposals else None, score_without_java=True)
    card = results["card"]
    assert card["protocol"] == protocol
    assert card["annotations"]["file"] == annotation.name and card["annotations"]["sha256"] == sha256(annotation)
    assert card["items"]["unit"] == PROTOCOLS[protocol].unit and card["items"]["scored"] == card["items"]["in_file"] == items
    assert card["world_size"] == 1 and card["checkpoint"]["sha256"] == sha256(stage2_checkpoint)
    assert card["prompt"]["caption"] == "describe the region {region} :" and card["decoding"]["num_beams"] == 1
    assert not card["comparable"] and any("without Java" in r for r in card["not_comparable_because"]) == (protocol in ("refcocog-regcap", "vg-regcap", "vg-densecap"))
    markdown = (out / "results.md").read_text()
    assert markdown.index("## Results card") < markdown.index("## Scores") and card["annotations"]["sha256"] in markdown

    scores = results[protocol]
    predictions = json.loads((out / "predictions.json").read_text())
    # the predictions file scores to the same numbers through `evaluate` (the same code, another entry point)
    again = evaluate(protocol, str(annotation), str(out / "predictions.json"), out=str(tmp_path / "again"),
                     proposals=str(proposals) if proposals else None, java=False)
    assert again[protocol] == scores
    if protocol in ("refcocog-regcap", "vg-regcap"):
        assert scores["scored"] == items and "CIDEr" in scores and "METEOR" not in scores  # METEOR needs Java
        assert sorted(p["image_id"] for p in predictions) == sorted(i.id for i in read_annotations(annotation, PROTOCOLS[protocol]).items)
    elif protocol == "vg-densecap":
        assert scores["regions_scored"] == scores["regions_in_file"] == 8 and scores["images_in_file"] == 3
    else:
        file = read_annotations(annotation, PROTOCOLS[protocol])
        target = {i.id: i.target for i in file.items}
        picked = [p for p in predictions if p["bbox"] is not None]
        hits = sum(box_iou_one([p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2], p["bbox"][1] + p["bbox"][3]], target[p["image_id"]]) >= 0.5 for p in picked)
        assert scores["acc@0.5"] == pytest.approx(hits / 6) and scores["sentences"] == 6
        # rec: image 0 has a right and a wrong proposal, image 2 one right one, the rest none;
        # gt-ranking: COCO image 900001 has two referred boxes (two sentences), the others one
        assert scores["chance"] == pytest.approx(0.25 if protocol == "refcocog-rec" else 5 / 6)
        assert f"| {protocol} | chance |" in markdown
        if protocol == "refcocog-rec":
            assert scores["without_candidates"] == 4 and len(picked) == scores["predicted"] == 2 and card["proposals"]["sha256"] == sha256(proposals)
            assert card["items"]["expected"] == 4896  # the fixture is named like MDETR's val file: 6 of 4,896 is not comparable
            assert any("published set 4896" in r for r in card["not_comparable_because"])


def test_the_refcocog_variants_read_the_same_boxes_and_sentences():
    need_eval_fixtures()
    protocol = PROTOCOLS["refcocog-regcap"]
    glamm = read_annotations(GLAMM_REFCOCOG, protocol)
    for name in ("refcocog_cap_val.json", "finetune_refcocog_val_with_mask.json", "controlcap_dynrefer_refcocog_val.json"):
        other = read_annotations(EVAL / "refcocog_regcap" / name, protocol)
        assert [i.id for i in other.items] == [i.id for i in glamm.items], name
        for a, b in zip(glamm.items, other.items):
            assert b.regions[0]["box"] == pytest.approx(a.regions[0]["box"]), name  # DynRefer's xyxy read as xyxy, the others' xywh converted
            assert b.regions[0]["captions"] == a.regions[0]["captions"], name  # Osprey's caption is on the image entry
    assert glamm.items[0].regions[0]["box"] == pytest.approx([112.5, 40.2, 112.5 + 180.3, 40.2 + 420.6])
    assert "xyxy" in read_annotations(EVAL / "refcocog_regcap" / "controlcap_dynrefer_refcocog_val.json", protocol).format


def _hand_built_rec(tmp_path: Path) -> tuple[Path, Path]:
    """Three sentences on 100x100 images; sentence 0 has a right proposal (IoU 0.6) and a wrong one (0.4), sentence 1 only the wrong one, sentence 2 none."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100, "caption": f"thing {i}", "original_id": i} for i in range(3)]
    annotations = [{"id": i, "image_id": i, "bbox": [0, 0, 100, 100], "category_id": 1} for i in range(3)]
    annotation = tmp_path / "finetune_refcocog_val.json"
    annotation.write_text(json.dumps({"images": images, "annotations": annotations}))
    right, wrong = [0, 0, 100, 60], [0, 0, 100, 40]  # xywh
    proposals = tmp_path / "proposals.json"
    proposals.write_text(json.dumps([{"image_id": 0, "bbox": right, "score": 0.9}, {"image_id": 0, "bbox": wrong, "score": 0.8},
                                     {"image_id": 1, "bbox": wrong, "score": 0.7}]))
    return annotation, proposals


def test_rec_with_proposals_scores_a_hand_built_case_exactly(tmp_path):
    annotation, proposals = _hand_built_rec(tmp_path)
    run = open_protocol_run("refcocog-rec", str(annotation), proposals=str(proposals), with_images=False)
    target = [0.0, 0.0, 100.0, 100.0]
    right, wrong = (c["box"] for c in run.candidates[0])
    assert box_iou_one(right, target) == pytest.approx(0.6) and box_iou_one(wrong, target) == pytest.approx(0.4)
    import torch

    # the model picks the candidate it scores highest: the right one here, the wrong one for sentence 1
    assert pick_box(torch.tensor([-2.0, -5.0])) == 0 and pick_box(torch.tensor([-5.0, -2.0])) == 1
    targets = {i.id: i.target for i in run.annotations.items}
    right_picked = rec_scores(targets, {0: right, 1: wrong}, run.candidates)
    assert right_picked["acc@0.5"] == pytest.approx(1 / 3)  # over all three sentences: 1 hit, 1 miss, 1 without candidates
    assert right_picked["mIoU"] == pytest.approx((0.6 + 0.4 + 0.0) / 3)
    assert right_picked["chance"] == pytest.approx((1 / 2 + 0 + 0) / 3) and right_picked["without_candidates"] == 1
    assert rec_scores(targets, {0: wrong, 1: wrong}, run.candidates)["acc@0.5"] == 0.0
    # the same through `evaluate` with a COCO results file of picked boxes
    predictions = tmp_path / "picked.json"
    predictions.write_text(json.dumps([{"image_id": 0, "bbox": [0, 0, 100, 60]}, {"image_id": 1, "bbox": [0, 0, 100, 40]}]))
    scores = evaluate("refcocog-rec", str(annotation), str(predictions), out=str(tmp_path / "out"), proposals=str(proposals))
    assert scores["refcocog-rec"]["acc@0.5"] == pytest.approx(1 / 3) and scores["refcocog-rec"]["predicted"] == 2
    assert "only 2 of the file's 3 sentences" in " ".join(scores["card"]["not_comparable_because"])


def test_osprey_outputs_score_against_its_caption_only_ground_truth(tmp_path):
    need_eval_fixtures()
    osprey = EVAL / "refcocog_regcap" / "osprey_outputs"
    results = evaluate("refcocog-regcap", str(osprey / "captions_refcocog_gt.json"), str(osprey / "captions_refcocog_osprey.json"), out=str(tmp_path / "a"), java=False)
    assert results["refcocog-regcap"]["scored"] == results["refcocog-regcap"]["in_file"] == 3  # string ids, as Osprey writes them
    # against GLaMM's file the three predicted ids are scored and the card says half the file is missing
    results = evaluate("refcocog-regcap", str(GLAMM_REFCOCOG), str(osprey / "captions_refcocog_osprey.json"), out=str(tmp_path / "b"), java=False)
    assert results["card"]["items"]["scored"] == 3 and results["card"]["items"]["in_file"] == 6 and not results["card"]["comparable"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_protocol_stream_hands_out_every_item_exactly_once(world_size, workers):
    run = ProtocolRun(PROTOCOLS["vg-regcap"], type("File", (), {"items": list(range(7))})())
    seen = [i for rank in range(world_size) for w in range(workers) for i in ProtocolStream(run, 64, rank, world_size).indices(w, workers)]
    assert sorted(seen) == list(range(7))  # none twice, none missed, no padding (7 is odd)


def test_the_shards_test_names_its_protocol_and_prints_gt_ranking_chance(synthetic_data, stage1_checkpoint, tiny_lm, stage2_checkpoint, tmp_path):
    results = run_test(stage1_checkpoint, tiny_lm, stage2_checkpoint, tmp_path, data_dirs=[str(synthetic_data)], score_without_java=True)
    card = results["card"]
    manifest = synthetic_data / "test" / "manifest.json"
    assert card["protocol"] == "synthetic" and card["annotations"][0]["sha256"] == sha256(manifest)
    assert card["items"]["scored"] == card["items"]["expected"] == json.loads(manifest.read_text())["num_regions"]
    assert card["sections"] == {"classification": "synthetic-classification", "caption": "synthetic-regcap", "gt-ranking": "gt-ranking", "spatial": "synthetic-spatial"}
    ranking = results["gt-ranking"]
    assert 0.0 < ranking["chance"] < 1.0 and ranking["expressions"] > 0
    assert "| gt-ranking | chance |" in (tmp_path / "results.md").read_text()


def test_a_protocol_test_without_java_stops_before_the_model_runs(stage1_checkpoint, tiny_lm, stage2_checkpoint, tmp_path, monkeypatch):
    need_eval_fixtures()
    images = images_for(GLAMM_REFCOCOG, tmp_path / "images")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no `java`
    with pytest.raises(MissingJavaError, match=r"^caption scoring needs Java .*\(--data\.score_without_java true"):
        run_test(stage1_checkpoint, tiny_lm, stage2_checkpoint, tmp_path / "run", protocol="refcocog-regcap", annotations=str(GLAMM_REFCOCOG), images=str(images))
    assert not (tmp_path / "run" / "predictions.json").exists()


def test_scoring_in_chunks_gives_the_scores_of_one_call(stage2_checkpoint):
    import torch

    from fineregion_pl.evaluation.protocol_loop import score_in_chunks
    from fineregion_pl.model.captioner import RegionCaptioner

    captioner = RegionCaptioner.from_checkpoint(str(stage2_checkpoint)).eval()
    prompts = torch.randn(5, 3, captioner.language.hidden_size, generator=torch.Generator().manual_seed(0))
    texts = ["the red circle", "a blue square on the left", "thing", "the big one", "a green triangle"]
    with torch.no_grad():
        whole = captioner.score(prompts, texts, "referring").float()
        captioner.config.generation_batch_size = 2  # 5 rows: chunks of 2, 2, 1
        chunked = score_in_chunks(captioner, prompts, texts, "referring")
    assert chunked.shape == (5,) and torch.allclose(chunked, whole, atol=1e-4)
    assert score_in_chunks(captioner, prompts[:0], [], "referring").shape == (0,)
