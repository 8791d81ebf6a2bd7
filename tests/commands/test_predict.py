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
