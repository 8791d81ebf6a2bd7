"""``fineregion-pl predict`` on images and boxes of the real Visual Genome fixture records."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from convert_helpers import VG, need_fixtures
from PIL import Image

from fineregion_pl.model.checkpoint_files import read_checkpoint
from fineregion_pl.train.cli import run_lightning

FIELDS = {"image_id", "region_id", "box", "caption", "category_id", "category", "score"}


@pytest.fixture
def vg_images(tmp_path):
    """Placeholder images of the fixtures' sizes, and the first regions of each as a boxes file."""
    need_fixtures()
    images = json.loads((VG / "image_data.json").read_text())
    regions = json.loads((VG / "region_descriptions_v1.2.json").read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    boxes = {}
    for info, entry in zip(images, regions):
        name = f"{info['image_id']}.jpg"
        Image.new("RGB", (info["width"], info["height"]), (90, 120, 150)).save(folder / name)
        chosen = [r for r in entry["regions"] if r["width"] > 0 and r["height"] > 0][:3]
        boxes[name] = {"boxes": [[r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]] for r in chosen], "ids": [r["region_id"] for r in chosen]}
    # names that one picture file would get before issue 20, and a JPEG cut short (its header probes fine)
    first = next(iter(boxes))
    for name in ("a b.jpg", "a_b.jpg"):
        (folder / name).write_bytes((folder / first).read_bytes())
        boxes[name] = boxes[first]
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 10, 10)).save(buffer, format="JPEG")
    (folder / "broken.jpg").write_bytes(buffer.getvalue()[:3000])
    boxes["broken.jpg"] = {"boxes": [[1, 1, 20, 20]], "ids": [0]}
    lines = [json.dumps({"image": name, **value}) for name, value in boxes.items()]
    (tmp_path / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    return folder, tmp_path / "boxes.jsonl", boxes


def test_predict_writes_one_jsonl_line_per_box_and_a_picture_per_image(vg_images, stage2_checkpoint, tmp_path):
    folder, boxes_file, boxes = vg_images
    hparams = read_checkpoint(stage2_checkpoint)["hyper_parameters"]
    config = {"model": {"class_path": "fineregion_pl.Stage2Module", "init_args": {k: hparams[k] for k in ("language_model", "init_from", "prompt_tokens", "prompt_hidden", "max_new_tokens")}},
              "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(tmp_path)}}
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    run_lightning([
        "predict", "--config", str(tmp_path / "predict.yaml"), "--ckpt_path", str(stage2_checkpoint),
        "--data.predict_images", str(folder), "--data.predict_boxes", str(boxes_file), "--data.image_size", "64",
        "--data.eval_batch_size", "2", "--data.num_workers", "0", "--writer.output_dir", str(out), "--writer.draw", "true",
    ])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    broken = boxes.pop("broken.jpg")  # skipped and counted, the run goes on
    assert len(rows) == sum(len(v["boxes"]) for v in boxes.values()) and len(broken["boxes"]) == 1
    summary = json.loads((out / "predictions.summary.json").read_text())
    assert summary["skipped_images"] == {"undecodable_image": 1} and summary["images"] == len(boxes) and summary["not_drawn"] == 0
    for row in rows:
        assert set(row) == FIELDS
        given = boxes[row["image_id"]]
        index = given["ids"].index(row["region_id"])
        assert row["box"] == pytest.approx(given["boxes"][index], abs=0.05)
        assert isinstance(row["caption"], str) and 0.0 <= row["score"] <= 1.0
        assert row["category"] == hparams["categories"][row["category_id"]]
    pictures = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(pictures) == len(boxes)  # one file per image: "a b.jpg" and "a_b.jpg" no longer share one
    assert "a_b.jpg.png" in pictures and any(p.startswith("a_b.jpg-") for p in pictures)
    with Image.open(out / "images" / pictures[0]) as picture:
        assert max(picture.size) >= 512


def predict_config(stage2_checkpoint, tmp_path):
    hparams = read_checkpoint(stage2_checkpoint)["hyper_parameters"]
    config = {"model": {"class_path": "fineregion_pl.Stage2Module", "init_args": {k: hparams[k] for k in ("language_model", "init_from", "prompt_tokens", "prompt_hidden", "max_new_tokens")}},
              "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(tmp_path)}}
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "predict.yaml"


def run_predict(config, stage2_checkpoint, folder, boxes_file, out, *extra):
    run_lightning([
        "predict", "--config", str(config), "--ckpt_path", str(stage2_checkpoint), "--data.predict_images", str(folder),
        "--data.predict_boxes", str(boxes_file), "--data.image_size", "64", "--data.eval_batch_size", "2", "--data.num_workers", "0",
        "--writer.output_dir", str(out), *extra,
    ])
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_predict_on_a_coco_results_file_writes_one_caption_per_kept_detection(vg_images, stage2_checkpoint, tmp_path):
    """The fixture images' regions as a detector's output (COCO results, keyed by image_id, scored,
    one with a mask): the threshold and top-k decide which are described, one line each."""
    folder, _, boxes = vg_images
    detections = []
    for name, value in boxes.items():
        if not name.split(".")[0].isdigit():  # the fixture's 'a b.jpg' (picture-name collisions) has no COCO image_id
            continue
        for rank, (x0, y0, x1, y1) in enumerate(value["boxes"]):
            detections.append({"image_id": int(name.split(".")[0]), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": round(0.95 - 0.2 * rank, 2), "category_id": 1})
        detections.append({"image_id": int(name.split(".")[0]), "bbox": [0, 0, 10, 10], "score": 0.1, "category_id": 2})  # below the threshold
    x, y, _, _ = detections[0]["bbox"]
    detections[0]["segmentation"] = [[x, y, x + 5, y, x + 5, y + 5]]  # a mask (polygon) for one detection
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    threshold, top_k = 0.5, 2
    kept = {}
    for index, d in enumerate(detections):
        if d["score"] >= threshold:
            kept.setdefault(f"{d['image_id']}.jpg", []).append((d["score"], index))
    kept = {name: sorted(found, key=lambda s: -s[0])[:top_k] for name, found in kept.items()}
    rows = run_predict(predict_config(stage2_checkpoint, tmp_path), stage2_checkpoint, folder, tmp_path / "detections.json", tmp_path / "out",
                       "--data.predict_score_threshold", str(threshold), "--data.predict_top_k", str(top_k))
    assert sorted((r["image_id"], r["region_id"]) for r in rows) == sorted((name, index) for name, found in kept.items() for _, index in found)
    for row in rows:
        x, y, w, h = detections[row["region_id"]]["bbox"]
        assert row["box"] == pytest.approx([x, y, x + w, y + h], abs=0.05) and isinstance(row["caption"], str)


def test_detect_writes_coco_results_that_predict_reads(vg_images, stage2_checkpoint, tmp_path):
    """``fineregion-pl detect`` with a torchvision detector (random weights: no download here, so
    its boxes mean nothing) writes a COCO results file; predict describes every detection kept."""
    from fineregion_pl.commands.detect import detect

    folder, _, _ = vg_images
    detect(images=str(folder), out=str(tmp_path / "detections.json"), model="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none",
           min_score=0.0, max_detections=3, device="cpu")
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert detections and {tuple(sorted(d)) for d in detections} == {("bbox", "category_id", "file_name", "score")}
    assert {d["file_name"] for d in detections} <= {p.name for p in folder.iterdir()}
    rows = run_predict(predict_config(stage2_checkpoint, tmp_path), stage2_checkpoint, folder, tmp_path / "detections.json", tmp_path / "out")
    assert sorted((r["image_id"], r["region_id"]) for r in rows) == sorted((d["file_name"], i) for i, d in enumerate(detections))


def test_detect_writes_a_mask_rcnn_mask_as_an_rle_the_regions_read():
    """A Mask R-CNN output (as torchvision gives it: soft masks ``N x 1 x H x W``) becomes COCO
    results whose RLE decodes to the thresholded mask and passes the server's and predict's checks."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    from fineregion_pl.commands.detect import detections_of
    from fineregion_pl.model.detections import regions_from_detections

    soft = torch.zeros(2, 1, 16, 20)
    soft[0, 0, 3:12, 2:10] = 0.9
    soft[1, 0, 5:7, 15:19] = 0.6
    soft[1, 0, 8, 8] = 0.4  # below 0.5: not in the mask
    output = {"boxes": torch.tensor([[2.0, 3.0, 10.0, 12.0], [15.0, 5.0, 19.0, 7.0]]), "scores": torch.tensor([0.8, 0.3]),
              "labels": torch.tensor([3, 1]), "masks": soft}
    rows = detections_of(output, "a.png", [f"class {i}" for i in range(5)])
    assert [(r["file_name"], r["bbox"], r["category_id"], r["category_name"]) for r in rows] == [
        ("a.png", [2.0, 3.0, 8.0, 9.0], 3, "class 3"), ("a.png", [15.0, 5.0, 4.0, 2.0], 1, "class 1")]
    for row, expected in zip(rows, soft[:, 0] > 0.5):
        rle = dict(row["segmentation"], counts=row["segmentation"]["counts"].encode("ascii"))
        assert np.array_equal(mask_utils.decode(rle), expected.numpy().astype(np.uint8))
    regions = regions_from_detections(json.loads(json.dumps(rows)), "detections", 20, 16, score_threshold=0.5)
    assert [r["id"] for r in regions] == [0] and regions[0]["segmentation"]["size"] == [16, 20]
