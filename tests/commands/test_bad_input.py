"""Every kind of bad input gives a one-line error naming the culprit, or a counted skip."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_encoder_config, tiny_trainer
from learning import first_batch
from PIL import Image
from torch.utils.data import DataLoader

from fineregion_pl import RegionDataModule, Stage1Module
from fineregion_pl.data.image_folder import ImageBoxesDataset, read_boxes_file
from fineregion_pl.data.shards import encode_sample, shard_writer, write_json_atomic
from fineregion_pl.model.checkpoint_files import load_stage1_weights, read_checkpoint
from fineregion_pl.model.errors import BadInputError, NonFiniteLossError
from fineregion_pl.model.language_model import LanguageModelConfig, RegionLanguageModel

ROOT = Path(__file__).resolve().parents[2]


def jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg())
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not an image")
    Image.new("RGB", (400, 300)).save(tmp_path / "huge.png")
    return tmp_path


def boxes_file(folder: Path, content) -> Path:
    path = folder / "boxes.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    "box, message",
    [
        ([10, 10, 5, 20], r"region 0 has x1 <= x0 \(5.0 <= 10.0\)"),
        ([10, 30, 20, 20], r"region 0 has y1 <= y0"),
        ([float("nan"), 0, 5, 5], "region 0 has a non-finite value"),
        ([1, 2, 3], "region 0 is not four numbers"),
        (["a", 2, 3, 4], "region 0 is not four numbers"),
    ],
)
def test_malformed_boxes_are_one_line_errors_naming_image_and_region(folder, box, message):
    with pytest.raises(BadInputError, match=message) as err:
        read_boxes_file(boxes_file(folder, {"ok.jpg": [box]}))
    assert "image 'ok.jpg'" in str(err.value) and "\n" not in str(err.value)


def test_boxes_outside_the_image_are_errors_and_near_edges_are_clamped(folder):
    with pytest.raises(BadInputError, match=r"image 'ok.jpg' region 1 box \[-30.0, 0.0, 10.0, 10.0\] is outside the 64x48 image"):
        ImageBoxesDataset(folder, boxes_file(folder, {"ok.jpg": [[0, 0, 10, 10], [-30, 0, 10, 10]]}), image_size=64)
    dataset = ImageBoxesDataset(folder, boxes_file(folder, {"ok.jpg": [[-1, -1, 65, 49]]}), image_size=64)
    assert [r["box"] for r in dataset.records[0]["regions"]] == [[0.0, 0.0, 64.0, 48.0]]


def test_missing_unreadable_and_oversized_images_are_counted_skips(folder):
    content = {"ok.jpg": [[0, 0, 10, 10]], "missing.jpg": [[0, 0, 1, 1]], "garbage.jpg": [[0, 0, 1, 1]], "huge.png": [[0, 0, 1, 1]]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageBoxesDataset(folder, boxes_file(folder, content), image_size=64, max_pixels=100_000)
    assert dataset.skipped == {"missing_image": 1, "unreadable_image": 1, "oversized_image": 1}
    assert len(dataset) == 1 and dataset[0].image_id == "ok.jpg"
    messages = [str(w.message) for w in caught]
    assert any("missing.jpg: not found" in m for m in messages) and any("garbage.jpg: unreadable" in m for m in messages)
    assert any("400x300 is over max_pixels" in m for m in messages)


def test_an_image_without_regions_gives_no_rows_and_no_crash(folder):
    dataset = ImageBoxesDataset(folder, boxes_file(folder, {"ok.jpg": []}), image_size=64)
    assert dataset[0].region_ids == [] and dataset[0].boxes.shape == (0, 4)


def test_corrupt_jpeg_inside_a_shard_is_skipped_with_its_key_named(tmp_path):
    split = tmp_path / "test"
    split.mkdir()
    record = lambda i: {"image_id": f"im{i}", "width": 64, "height": 48, "regions": [{"id": 0, "box": [1, 1, 20, 20], "captions": ["a red square"]}]}
    with shard_writer(str(split / "test-%06d.tar"), maxcount=10) as writer:
        writer.write(encode_sample("im0", jpeg(), record(0)))
        writer.write(encode_sample("im1", b"not a jpeg", record(1)))
        writer.write(encode_sample("im2", jpeg()[:150], record(2)))
        writer.write(encode_sample("im3", jpeg(), record(3)))
    write_json_atomic(split / "manifest.json", {"split": "test", "num_images": 4, "shards": ["test-000000.tar"], "categories": []})
    data = RegionDataModule([str(tmp_path)], image_size=64, batch_size=8, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [i for batch in data.test_dataloader() for i in batch["image_ids"]]
    assert ids == ["im0", "im3"]
    skipped = [str(w.message) for w in caught if "skipped sample" in str(w.message)]
    assert len(skipped) == 2 and "'im1'" in skipped[0] and "'im2'" in skipped[1] and "test-000000.tar" in skipped[0]


def test_a_language_model_that_does_not_load_is_named(tmp_path):
    with pytest.raises(BadInputError, match=f"cannot load language model '{tmp_path / 'nope'}'"):
        RegionLanguageModel(LanguageModelConfig(name_or_path=str(tmp_path / "nope")))


def test_a_stage2_checkpoint_is_refused_as_init_from(stage1_checkpoint, tmp_path):
    not_stage1 = {"state_dict": {"language.x": torch.zeros(1), "prompt.y": torch.zeros(1)}, "hyper_parameters": {}}
    torch.save(not_stage1, tmp_path / "stage2.ckpt")
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5)
    with pytest.raises(BadInputError, match=r"is not a stage-1 checkpoint: no 'model.\*' weights \(top-level keys: \['language', 'prompt'\]\)"):
        load_stage1_weights(module.model, read_checkpoint(tmp_path / "stage2.ckpt"), tmp_path / "stage2.ckpt")
    with pytest.raises(BadInputError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "broken.ckpt")


def test_non_finite_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(synthetic_data, tmp_path):
    torch.manual_seed(0)
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5, masking="hard", warmup_steps=1)
    good = first_batch(RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0))
    bad = {**good, "images": good["images"].clone()}
    bad["images"][0, 0, 0, 0] = float("nan")
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = tiny_trainer(tmp_path, max_steps=5, callbacks=[checkpoints], limit_val_batches=0)
    batches = [good, good, good, bad, good]
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 3 .*last checkpoint on disk is the last good one"):
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_cli_reports_a_config_key_that_does_not_exist_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "fineregion_pl", "fit", "--config", "configs/quickstart/stage1.yaml", "--model.init_args.nonexistent", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "fineregion-pl: error: Option 'nonexistent' is not accepted; see --help"
    assert len(done.stderr.strip().splitlines()) <= 3
