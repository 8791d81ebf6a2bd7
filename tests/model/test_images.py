"""One image reader everywhere: odd images (EXIF-rotated, 16-bit, palette with transparency, alpha,
CMYK) read right by ``as_rgb``, and the same through every front door: the API, predict's image
folder and the shard stream of the training transforms give the same model input and captions."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fineregion_pl import RegionDataModule
from fineregion_pl.data.image_folder import ImageBoxesDataset
from fineregion_pl.data.shards import shard_writer, write_json_atomic
from fineregion_pl.model.captioner import RegionCaptioner
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.images import as_rgb
from fineregion_pl.model.transforms import collate_present, letterbox


def scene(width=48, height=32) -> np.ndarray:
    """An upright RGB picture whose halves differ, so a rotation or a wrong level shows."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (200, 40, 40)
    pixels[: height // 3, width // 2 :] = (30, 160, 220)
    return pixels


def odd_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """File name -> (file bytes, the upright 8-bit RGB pixels a viewer shows)."""
    out = {}
    upright = scene()
    stored = np.rot90(upright, k=1)  # stored turned left; EXIF 6 says "rotate 90 clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buffer, format="PNG", exif=exif)
    out["rotated.png"] = (buffer.getvalue(), upright)
    grey16 = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")
    level = np.floor(grey16.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
    out["sixteen.png"] = (buffer.getvalue(), np.repeat(level[..., None], 3, axis=2))
    palette = Image.fromarray(upright).quantize(colors=4)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    shown = np.asarray(palette.convert("RGBA")).copy()
    shown[shown[..., 3] == 0, :3] = 255  # transparent pixels on white
    out["palette.png"] = (buffer.getvalue(), shown[..., :3])
    rgba = np.dstack([upright, np.full(upright.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    with_white = upright.copy()
    with_white[:8, :8] = 255
    out["alpha.png"] = (buffer.getvalue(), with_white)
    cmyk = Image.fromarray(upright).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="TIFF")
    out["cmyk.tif"] = (buffer.getvalue(), np.asarray(cmyk.convert("RGB")))
    return out


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_as_rgb_reads_odd_images_as_a_viewer_shows_them(name):
    data, expected = odd_images()[name]
    image = as_rgb(data)
    assert image.mode == "RGB" and image.size == (expected.shape[1], expected.shape[0])
    assert np.abs(np.asarray(image).astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("value, message", [(None, "not NoneType"), (3.5, "not float"), (np.zeros((2, 3, 7)), "got shape \\(2, 3, 7\\)"),
                                            (b"not an image", "cannot be decoded")])
def test_as_rgb_refuses_what_is_not_a_picture_in_one_line(value, message):
    with pytest.raises(BadInputError, match=message):
        as_rgb(value, "image 0")


def test_every_front_door_gives_the_same_model_input_and_captions(stage2_checkpoint, tmp_path):
    captioner = RegionCaptioner.from_checkpoint(stage2_checkpoint)
    size = captioner.image_size
    images = odd_images()
    boxes = [[2.0, 2.0, 30.0, 20.0], [20.0, 4.0, 46.0, 30.0]]
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (data, _) in images.items():
        (folder / name).write_bytes(data)
    (tmp_path / "boxes.json").write_text(json.dumps({name: boxes for name in images}))
    # predict's image folder
    dataset = ImageBoxesDataset(folder, tmp_path / "boxes.json", size)
    predict_batch = collate_present([dataset[i] for i in range(len(dataset))])
    # the shard stream (training transforms), holding the files' own bytes
    split = tmp_path / "shards" / "test"
    split.mkdir(parents=True)
    with shard_writer(str(split / "test-%06d.tar")) as writer:
        for index, (name, (data, expected)) in enumerate(images.items()):
            record = {"image_id": name, "width": expected.shape[1], "height": expected.shape[0],
                      "regions": [{"id": i, "box": b, "captions": ["x"]} for i, b in enumerate(boxes)]}
            writer.write({"__key__": f"{index:03d}", "png": data, "json": json.dumps(record).encode()})
    write_json_atomic(split / "manifest.json", {"split": "test", "num_images": len(images), "shards": ["test-000000.tar"], "categories": []})
    stream_batch = next(iter(RegionDataModule([str(tmp_path / "shards")], image_size=size, batch_size=len(images), num_workers=0).test_dataloader()))
    for name, (_, expected) in images.items():
        reference, _ = letterbox(Image.fromarray(expected), size)
        for door, batch in (("predict", predict_batch), ("shards", stream_batch)):
            position = batch["image_ids"].index(name)
            assert torch.allclose(batch["images"][position], reference, atol=0.02), (door, name)
        api = [(r["caption"], r["score"]) for r in captioner.describe(folder / name, boxes)]
        assert api == [(r["caption"], r["score"]) for r in captioner.describe(Image.fromarray(expected), boxes)], name
        assert api == [(r["caption"], r["score"]) for r in captioner.describe(expected, torch.tensor(boxes))], name
        rows = [r for r in captioner.describe_batch(predict_batch) if r["image_id"] == name]
        assert [(r["caption"], r["score"]) for r in rows] == api, name
