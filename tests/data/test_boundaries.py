"""The issue-20 examples, one test each: what used to be a silent drop, a wrong value, a traceback or
a hang is now a one-line error naming file, record and field, or a skip that is warned and counted."""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings

import pytest
from convert_helpers import REPO, load_converter
from PIL import Image

from fineregion_pl import RegionDataModule
from fineregion_pl.data.convert import check_box as converter_box
from fineregion_pl.data.drawing import picture_name
from fineregion_pl.data.image_folder import ImageBoxesDataset, read_boxes_file
from fineregion_pl.data.shards import encode_sample, read_manifest, shard_writer, write_json_atomic
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError


def jpeg(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_no_string_is_read_as_a_box():
    assert converter_box("5599", 100, 100, 4.0)[1] == "box_malformed"
    assert converter_box(["55", "99", "1", "1"], 100, 100, 4.0)[1] == "box_malformed"  # was [55, 99, 56, 100]
    with pytest.raises(BadInputError, match=r"region 0 is not four numbers .*\['1', '2', '30', '20'\]"):
        check_box(["1", "2", "30", "20"], "image 0 region 0")


def test_an_image_named_twice_in_a_boxes_file_is_an_error(tmp_path):
    (tmp_path / "boxes.json").write_text('{"a.jpg": [[0, 0, 10, 10]], "a.jpg": [[1, 1, 5, 5]]}')
    with pytest.raises(BadInputError, match="key 'a.jpg' appears twice in one object"):
        read_boxes_file(tmp_path / "boxes.json")
    (tmp_path / "boxes.jsonl").write_text('{"image": "a.jpg", "boxes": []}\n{"image": "a.jpg", "boxes": []}\n')
    with pytest.raises(BadInputError, match=r"image 'a.jpg' appears twice \(entries 1 and 2\)"):
        read_boxes_file(tmp_path / "boxes.jsonl")


def test_more_boxes_than_the_cap_is_an_error_naming_the_option(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "boxes.json").write_text(json.dumps({"a.jpg": [[0, 0, 10, 10]] * 1500}))
    with pytest.raises(BadInputError, match=r"image 'a.jpg' has 1500 boxes, more than max_regions=1000 \(--data.predict_max_regions\)"):
        ImageBoxesDataset(tmp_path, tmp_path / "boxes.json", 64)
    assert len(ImageBoxesDataset(tmp_path, tmp_path / "boxes.json", 64, max_regions=1500)[0].region_ids) == 1500


def test_picture_names_never_collide():
    used: set[str] = set()
    names = [picture_name(n, used) for n in ("a b.jpg", "a_b.jpg", "x.jpg", "x.png", "x.png", "dir/x.png")]
    assert len(set(names)) == len(names) and names[1] == "a_b.jpg.png" and names[3:5] == ["x.png.png", "x.png-2.png"]


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("batch_size", -1), ("eval_batch_size", 0), ("max_regions", 0), ("num_workers", -2)])
def test_data_options_out_of_range_are_one_line(option, value):
    with pytest.raises(BadInputError, match=f"data.{option} must be at least"):
        RegionDataModule(["x"], **{option: value})


@pytest.mark.parametrize("option, value", [("lr", 0.0), ("lr", float("nan")), ("lr", float("inf")), ("warmup_steps", -1)])
def test_model_options_out_of_range_are_one_line(option, value):
    from fineregion_pl import Stage1Module

    with pytest.raises(BadInputError, match=f"model.{option} must be"):
        Stage1Module(num_classes=5, **{option: value})


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), (json.dumps({"split": "t", "num_images": "many", "shards": []}),
                                           "field num_images: Input should be a valid integer"), ("[]", "Input should be a valid dictionary")])
def test_bad_manifests_are_one_line(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BadInputError, match=message):
        read_manifest(tmp_path)


@pytest.mark.parametrize("field, value, message", [("box", "1 1 20 20", "field regions.0.box: Input should be a valid list"),
                                                   ("category_id", "zero", "field regions.0.category_id: Input should be a valid integer")])
def test_a_shard_record_of_the_wrong_type_is_a_named_skip(tmp_path, field, value, message):
    split = tmp_path / "test"
    split.mkdir()
    good = {"image_id": "i1", "width": 64, "height": 48, "regions": [{"id": 0, "box": [1, 1, 20, 20], "captions": ["x"], "category_id": 0}]}
    bad = json.loads(json.dumps(good))
    bad["image_id"] = "i0"
    bad["regions"][0][field] = value
    with shard_writer(str(split / "test-%06d.tar")) as writer:
        writer.write(encode_sample("i0", jpeg(), bad))
        writer.write(encode_sample("i1", jpeg(), good))
    write_json_atomic(split / "manifest.json", {"split": "test", "num_images": 2, "shards": ["test-000000.tar"], "categories": ["a"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [i for batch in RegionDataModule([str(tmp_path)], image_size=64, batch_size=4, num_workers=0).test_dataloader() for i in batch["image_ids"]]
    assert ids == ["i1"]
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipped sample 'i0'")]
    assert len(skipped) == 1 and message in skipped[0] and "test-000000.tar" in skipped[0]


def refer_layout(tmp_path, refs, instances_text):
    (tmp_path / "refer" / "refcocog").mkdir(parents=True)
    (tmp_path / "coco").mkdir()
    with open(tmp_path / "refer" / "refcocog" / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f)
    (tmp_path / "refer" / "refcocog" / "instances.json").write_text(instances_text)
    return ["--refer-root", str(tmp_path / "refer"), "--coco-images", str(tmp_path / "coco"), "--out", str(tmp_path / "out"), "--no-progress"]


EMPTY = json.dumps({"images": [], "annotations": [], "categories": []})


@pytest.mark.parametrize("refs, instances, message", [
    ([], EMPTY[:20], "instances.json is not valid JSON"),
    ([], "[]", "instances.json: expected a COCO object"),
    ([], json.dumps({"annotations": {"a": 1}}), "instances.json: annotations: expected a list"),
    ([{"x": 1}], EMPTY, r"refs\(umd\).p: ref 0: field image_id: Field required"),
    ([1, 2], EMPTY, r"refs\(umd\).p: ref 0: Input should be a valid dictionary"),
    ({"refs": []}, EMPTY, "expected a list of refs, found dict"),
])
def test_refer_inputs_of_the_wrong_shape_are_one_line(tmp_path, capsys, refs, instances, message):
    assert load_converter("refcocog").main(refer_layout(tmp_path, refs, instances)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize("files, message", [
    ({"region_descriptions.json": '{"regions": 1}'}, "region_descriptions.json: expected a list"),
    ({"region_descriptions.json": '[{"id": 1, "regions": [{"id": 3, "phrase": 5}]}]'}, "entry 0: field regions.0.phrase: Input should be a valid string"),
    ({"region_descriptions.json": "[]", "objects.json": '[{"image_id": 1, "objects": [{"names": "cat"}]}]'}, "field objects.0.names: Input should be a valid list"),
])
def test_visual_genome_inputs_of_the_wrong_shape_are_one_line(tmp_path, capsys, files, message):
    (tmp_path / "image_data.json").write_text("[]")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert load_converter("visual_genome").main(["--vg-root", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_split_file_whose_values_are_not_lists_is_one_line(tmp_path):
    (tmp_path / "split.json").write_text('{"train": 5}')
    with pytest.raises(BadInputError, match="split 'train': expected a list"):
        load_converter("visual_genome").read_split_file(tmp_path / "split.json")


@pytest.mark.parametrize("option, value, message", [("--model.init_args.lr", "0", "model.lr must be greater than 0, not 0.0"),
                                                    ("--model.init_args.lr", "nan", 'Parser key "lr": Expected a'),
                                                    ("--data.batch_size", "-1", "data.batch_size must be at least 1, not -1")])
def test_options_out_of_range_on_the_command_line_are_one_line(synthetic_data, capsys, option, value, message):
    from fineregion_pl.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart" / "stage1.yaml"), "--data.data_dirs", f"[{synthetic_data}]", option, value])
    assert exit_info.value.code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fineregion-pl: error: ") and message in err[-1] and not any("Traceback" in line for line in err)
