"""Bad evaluation input stops with one line naming it: a missing or wrong annotation file, repeated result ids, a missing or resized image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import EVAL, GLAMM_REFCOCOG, GLAMM_RESULTS, MDETR_REC, images_for, need_eval_fixtures
from PIL import Image

from fineregion_pl.commands.evaluate import evaluate
from fineregion_pl.data.protocol_data import open_protocol_run
from fineregion_pl.model.errors import BadInputError

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(BadInputError, match=r"^refcocog-regcap annotation file not found: .*nope\.json$"):
        open_protocol_run("refcocog-regcap", str(tmp_path / "nope.json"), images=str(tmp_path))


def test_a_wrong_annotation_file_is_named_with_what_to_use(tmp_path):
    need_eval_fixtures()
    grit = EVAL / "vg_regcap" / "grit_test.json"
    with pytest.raises(BadInputError, match=r"grit_test\.json: images\[0\] \(id 9000001\) has 3 annotations: vg-regcap scores one region per image entry; .* is protocol vg-densecap"):
        open_protocol_run("vg-regcap", str(grit), with_images=False)
    with pytest.raises(BadInputError, match=r"coco_det_results\.sample\.json: expected a COCO-style object .* got a JSON list \(is this a predictions or proposals file\?"):
        open_protocol_run("refcocog-regcap", str(EVAL / "proposals" / "coco_det_results.sample.json"), with_images=False)
    with pytest.raises(BadInputError, match=r"protocol refcocog-rec needs candidate boxes: --data.proposals"):
        open_protocol_run("refcocog-rec", str(MDETR_REC), images=str(tmp_path))
    broken = tmp_path / "broken.json"
    data = json.loads(GLAMM_REFCOCOG.read_text())
    del data["annotations"][2]["bbox"]
    broken.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"broken\.json: annotations\[2\] \(id 2\) has no 'bbox'$"):
        open_protocol_run("refcocog-regcap", str(broken), images=str(tmp_path))


def test_a_missing_image_and_a_resized_one_are_named(tmp_path):
    need_eval_fixtures()
    images = images_for(GLAMM_REFCOCOG, tmp_path / "images")
    (images / "COCO_train2014_000000900002.jpg").unlink()
    with pytest.raises(BadInputError, match=r"^image .*images/COCO_train2014_000000900002\.jpg not found \(1 of the images finetune_refcocog_val_captions\.json names"):
        open_protocol_run("refcocog-regcap", str(GLAMM_REFCOCOG), images=str(images))
    Image.new("RGB", (320, 213)).save(images / "COCO_train2014_000000900002.jpg")
    with pytest.raises(BadInputError, match=r"COCO_train2014_000000900002\.jpg is 320x213 but finetune_refcocog_val_captions\.json gives 640x427"):
        open_protocol_run("refcocog-regcap", str(GLAMM_REFCOCOG), images=str(images))


def test_repeated_result_ids_are_named_not_deduplicated(tmp_path):
    need_eval_fixtures()
    rows = json.loads(next(GLAMM_RESULTS.glob("*.json")).read_text())
    padded = tmp_path / "merged_ranks.json"
    padded.write_text(json.dumps(rows + rows[:1]))  # what a padded DistributedSampler adds
    with pytest.raises(BadInputError, match=r"merged_ranks\.json: entry 6 repeats image_id 0 \(first at entry 0\)"):
        evaluate("refcocog-regcap", str(GLAMM_REFCOCOG), str(padded), out=str(tmp_path / "out"), java=False)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 77, "caption": "a dog"}]))
    with pytest.raises(BadInputError, match=r"unknown\.json: entry 0 has image_id 77, which is not in finetune_refcocog_val_captions\.json"):
        evaluate("refcocog-regcap", str(GLAMM_REFCOCOG), str(unknown), out=str(tmp_path / "out"), java=False)
    # on the command line: one line, no traceback
    done = subprocess.run([sys.executable, "-m", "fineregion_pl", "evaluate", "refcocog-regcap", str(GLAMM_REFCOCOG), str(padded), "--out", str(tmp_path / "cli")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("fineregion-pl: error: ") and "repeats image_id 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_java_is_a_clear_error_and_java_false_scores_labelled_not_comparable(tmp_path, monkeypatch):
    need_eval_fixtures()
    no_java = dict(os.environ, PATH=str(Path(sys.executable).parent))  # this Python, and no `java`
    assert shutil.which("java", path=no_java["PATH"]) is None
    command = [sys.executable, "-m", "fineregion_pl", "evaluate", "refcocog-regcap", str(GLAMM_REFCOCOG), str(GLAMM_RESULTS)]
    done = subprocess.run(command + ["--out", str(tmp_path / "a")], cwd=ROOT, env=no_java, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fineregion-pl: error: caption scoring needs Java") and "--java false" in last
    assert not (tmp_path / "a" / "results.json").exists()  # nothing half-scored is written
    monkeypatch.setenv("PATH", no_java["PATH"])  # the same without Java, in this process: `--java false`
    results = evaluate("refcocog-regcap", str(GLAMM_REFCOCOG), str(GLAMM_RESULTS), out=str(tmp_path / "b"), java=False)
    assert "METEOR" not in results["refcocog-regcap"] and results["refcocog-regcap"]["CIDEr"] > 0
    assert results["card"]["metric_tokenizer"].startswith("Python regex tokenizer") and not results["card"]["comparable"]
    assert any("without Java" in reason for reason in results["card"]["not_comparable_because"])
    assert "NO: " in (tmp_path / "b" / "results.md").read_text()
