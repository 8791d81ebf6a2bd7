"""``data_prep/refcocog.py`` on the real RefCOCOg / RefCOCO records of the fixtures (refer-toolkit layout, placeholder images)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from convert_helpers import (
    FIXTURES,
    coco_image_name,
    instances_of,
    load_converter,
    manifests,
    need_fixtures,
    read_json,
    read_samples,
    ref_of,
    refer_layout,
    refer_records,
    shard_bytes,
)
from PIL import Image


@pytest.fixture(scope="module")
def refcocog():
    need_fixtures()
    return load_converter("refcocog")


def run(converter, refer_root: Path, coco: Path, out: Path, *flags: str) -> int:
    """The converter's exit code (in-process, as ``python data_prep/refcocog.py`` would run)."""
    return converter.main(["--refer-root", str(refer_root), "--coco-images", str(coco), "--out", str(out), "--no-progress", *flags])


def xyxy(bbox: list[float]) -> list[float]:
    """A COCO ``xywh`` box as xyxy."""
    return [bbox[0], bbox[1], round(bbox[0] + bbox[2], 3), round(bbox[1] + bbox[3], 3)]


def test_refcocog_umd_records(refcocog, tmp_path):
    records = refer_records("refcocog_partial_records.json")
    refer_root, coco = refer_layout(tmp_path, [ref_of(r) for r in records], instances_of(records))
    assert run(refcocog, refer_root, coco, tmp_path / "out") == 0
    found = manifests(tmp_path / "out")
    assert set(found) == {"train", "val", "test"}  # umd splits, even when the file has no test ref
    categories = sorted(read_json(FIXTURES / "coco_categories.json"), key=lambda c: c["id"])
    assert all(m["categories"] == [c["name"] for c in categories] for m in found.values())
    (key, jpg, record), = read_samples(tmp_path / "out" / "train")
    rec = records[0]
    assert key == str(rec["image_id"]) and jpg == (coco / coco_image_name(rec)).read_bytes()  # original bytes, untouched
    assert record["file_name"] == "COCO_train2014_000000519404.jpg" != ref_of(rec)["file_name"]
    assert (record["source"], record["split"], record["width"], record["height"]) == ("refcocog", "train", 640, 480)
    (region,) = record["regions"]
    assert region["id"] == rec["ann_id"] and region["box"] == xyxy(rec["bbox"]) == [0.0, 45.95, 238.92, 454.59]
    assert (region["category"], region["category_id"]) == ("person", 0)
    assert region["captions"] == [s["sent"] for s in rec["sentences"]] == region["referring"]
    assert region["captions_raw"] == [s["raw"] for s in rec["sentences"]]
    assert region["segmentation"] == rec["segmentation"]
    # the val ref's annotation is not in instances.json (its bbox is unknown): counted, not lost
    assert found["val"]["skipped"] == {"missing_annotation": 1} and found["val"]["num_regions"] == 0
    assert sum(m["num_regions"] + sum(m["skipped"].values()) for m in found.values()) == len(records)
    assert run(refcocog, refer_root, coco, tmp_path / "again") == 0
    assert shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "out")


def unc_layout(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """The RefCOCO unc records, the first one's sentences spread over two refs of its annotation."""
    records = refer_records("refcoco_unc_records.json")
    first = records[0]
    refs = [ref_of(first) | {"sentences": first["sentences"][:2], "sent_ids": first["sent_ids"][:2]},
            *[ref_of(r) for r in records[1:]],
            ref_of(first, ref_id=90000) | {"sentences": first["sentences"][2:], "sent_ids": first["sent_ids"][2:]}]
    refer_root, coco = refer_layout(tmp_path, refs, instances_of(records), dataset="refcoco", split_by="unc")
    return refer_root, coco, records


def test_refcoco_unc_refs_of_one_annotation_become_one_region(refcocog, tmp_path):
    refer_root, coco, records = unc_layout(tmp_path)
    assert run(refcocog, refer_root, coco, tmp_path / "out", "--dataset", "refcoco") == 0
    found = manifests(tmp_path / "out")
    assert set(found) == {"train", "val", "testA", "testB"}
    (_, _, record), = read_samples(tmp_path / "out" / "train")
    first = records[0]
    (region,) = record["regions"]
    assert record["file_name"] == first["image_file_name"] and (record["width"], record["height"]) == (427, 640)
    assert region["box"] == xyxy(first["bbox"]) == [103.93, 299.99, 238.15, 477.41]
    assert region["ref_ids"] == [0, 90000] and region["sentence_ids"] == first["sent_ids"]
    assert region["captions"] == ["the lady with the blue shirt", "lady with back to us", "blue shirt"]
    assert region["captions_raw"] == ["THE LADY WITH THE BLUE SHIRT", "lady w back to us", "blue shirt"]
    assert found["train"]["skipped"] == {"missing_annotation": 1} and found["testA"]["skipped"] == {"missing_annotation": 1}
    assert found["train"]["num_sentences"] == 3 and found["train"]["dataset"] == "refcoco"
    index = refcocog.category_index(read_json(FIXTURES / "coco_categories.json"))
    assert index[records[2]["category_id"]] == (46, "banana") and index[90] == (79, "toothbrush")


def test_max_side_scales_boxes_and_segmentations(refcocog, tmp_path):
    refer_root, coco, records = unc_layout(tmp_path)
    assert run(refcocog, refer_root, coco, tmp_path / "out", "--dataset", "refcoco", "--max-side", "320") == 0
    (_, jpg, record), = read_samples(tmp_path / "out" / "train")
    assert Image.open(io.BytesIO(jpg)).size == (record["width"], record["height"]) == (214, 320)
    sx, sy = 214 / 427, 320 / 640
    first = records[0]
    (region,) = record["regions"]
    assert region["box"] == pytest.approx([v * s for v, s in zip(xyxy(first["bbox"]), (sx, sy, sx, sy))], abs=1e-3)
    assert region["segmentation"][0] == pytest.approx([v * (sx if i % 2 == 0 else sy) for i, v in enumerate(first["segmentation"][0])], abs=1e-3)


def test_rle_segmentations_are_scaled_too(refcocog):
    from pycocotools import mask as mask_utils

    from fineregion_pl.model.transforms import scale_segmentation

    first = refer_records("refcoco_unc_records.json")[0]
    rle = mask_utils.merge(mask_utils.frPyObjects(first["segmentation"], first["height"], first["width"]))
    rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    half = scale_segmentation(rle, 0.5, 0.5, first["width"] // 2, first["height"] // 2)
    assert half["size"] == [first["height"] // 2, first["width"] // 2]
    assert math.isclose(mask_utils.area({**half, "counts": half["counts"].encode()}), first["area"] / 4, rel_tol=0.05)


def test_bad_refs_are_counted_and_strict_names_the_record(refcocog, tmp_path, capsys):
    rec = refer_records("refcocog_partial_records.json")[0]
    instances = instances_of([rec])
    good = dict(instances["annotations"][0])
    bad_boxes = {1: [10.0, 10.0, 0.0, 20.0], 2: [float("nan"), 10.0, 5.0, 5.0], 3: [700.0, 10.0, 20.0, 20.0]}  # the image is 640 x 480
    instances["annotations"] += [good | {"id": ann_id, "bbox": box} for ann_id, box in bad_boxes.items()]
    empty = [{"raw": "  ", "sent": " ", "sent_id": 7, "tokens": []}]
    refs = [ref_of(rec, ref_id=10) | {"sentences": rec["sentences"] + empty},    # one empty sentence dropped
            *[ref_of(rec, ref_id=10 + a) | {"ann_id": a} for a in bad_boxes],     # bad boxes
            ref_of(rec, ref_id=20) | {"ann_id": 4, "sentences": empty},           # no annotation 4
            ref_of(rec, ref_id=21) | {"ann_id": 1241542} | {"sentences": empty}]  # merged into ann 1241542: only sentences dropped
    refer_root, coco = refer_layout(tmp_path, refs, instances)
    assert run(refcocog, refer_root, coco, tmp_path / "out") == 0
    train = manifests(tmp_path / "out")["train"]
    assert train["skipped"] == {"box_empty": 1, "box_not_finite": 1, "box_outside_image": 1, "missing_annotation": 1}
    assert train["skipped_sentences"] == {"empty_text": 2} and train["num_regions"] == 1 and train["num_sentences"] == 2
    assert "box_outside_image 1" in capsys.readouterr().out
    assert run(refcocog, refer_root, coco, tmp_path / "strict", "--strict") == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: refs(umd).p: image 519404 ref 10 sentence 7 is empty"]
    refs[0]["sentences"] = rec["sentences"]
    refs.pop()
    refer_layout(tmp_path, refs, instances)
    assert run(refcocog, refer_root, coco, tmp_path / "strict2", "--strict") == 2
    assert capsys.readouterr().err.strip() == "error: refs(umd).p: image 519404 ref 20 ann 4 has no annotation in instances.json"
    refs.pop()
    refer_layout(tmp_path, refs, instances)
    assert run(refcocog, refer_root, coco, tmp_path / "strict3", "--strict") == 2
    assert capsys.readouterr().err.strip() == "error: refs(umd).p: image 519404 ref 11 ann 1 has width 0"


def test_python2_pickles_with_utf8_text_load(refcocog, tmp_path):
    # [{"raw": "café"}] as Python 2 pickles it: a byte string (SHORT_BINSTRING) holding UTF-8
    (tmp_path / "refs.p").write_bytes(b"\x80\x02]}U\x03rawU\x05caf\xc3\xa9sa.")
    assert refcocog.load_refs(tmp_path / "refs.p") == [{"raw": "café"}]


def test_datamodule_reads_the_shards(refcocog, tmp_path):
    from fineregion_pl.data import RegionDataModule

    refer_root, coco, records = unc_layout(tmp_path)
    assert run(refcocog, refer_root, coco, tmp_path / "out", "--dataset", "refcoco") == 0
    dm = RegionDataModule(data_dirs=[str(tmp_path / "out")], image_size=64, batch_size=1, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    scale = 64 / 640
    assert batch["images"].shape == (1, 3, 64, 64) and batch["image_ids"] == [581857]
    assert batch["boxes"][0, 0].tolist() == pytest.approx([v * scale for v in xyxy(records[0]["bbox"])], abs=1e-3)
    assert batch["categories"].tolist() == [[0]] and batch["captions"][0][0] in batch["references"][0][0]
    assert batch["referring"][0][0] == batch["references"][0][0]
    assert dm.categories[:2] == ["person", "bicycle"] and len(dm.categories) == 80


def test_help_documents_every_flag(refcocog, capsys):
    parser = refcocog.build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 13 and all(a.help and a.option_strings[0] in text for a in flags)
    assert "pickle" in refcocog.__doc__ and "trusted" in refcocog.__doc__
