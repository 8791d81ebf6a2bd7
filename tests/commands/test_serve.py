"""``fineregion-pl serve``: request checks without a server, then a real LitServe server on loopback.

The server tests start ``python -m fineregion_pl serve`` with a tiny trained stage-2 checkpoint,
send it every kind of malformed request (each must get a 4xx with one line, and the server must
go on answering), concurrent good requests (they must be batched, and their captions must equal
``RegionCaptioner.describe`` for the same inputs), detections in the COCO results format and masks.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from front_doors import VerbProcess, free_port, png
from PIL import Image

from fineregion_pl.commands.serve_requests import Limits, RequestError, check_request, parse_json_body
from fineregion_pl.data.synthetic import make_scene


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says ``width`` x ``height``: what a decompression bomb looks like before decoding."""
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scene_request(index: int = 0, count: int = 2) -> tuple[Image.Image, list[list[float]], dict]:
    image, record = make_scene(0, "test", index)
    boxes = [r["box"] for r in record["regions"][:count]]
    return image, boxes, {"image": b64(png(image)), "boxes": boxes}


def rle_of(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------- request checks, no server

LIMITS = Limits(max_regions=8, max_pixels=1_000_000)
IMAGE = png(make_scene(0, "test", 0)[0])


@pytest.mark.parametrize(
    "fields, image_bytes, status, expected",
    [
        ({"boxes": [[1, 1, 5, 5]]}, None, 422, "missing field 'image' (base64, or a file in multipart/form-data)"),
        ({"image": b64(IMAGE)}, None, 422, "missing field 'boxes' ([[x0, y0, x1, y1], ...]) or 'detections' (COCO results)"),
        ({"image": b64(IMAGE), "boxes": [[1, 1, 5, 5]], "boxs": []}, None, 422, "unknown field 'boxs' (a request has image, boxes, detections, masks, ids, score_threshold, top_k)"),
        ({"image": b64(IMAGE), "boxes": [], "detections": []}, None, 422, "give either 'boxes' or 'detections', not both"),
        ({"image": "%%%", "boxes": [[1, 1, 5, 5]]}, None, 400, "'image' is not valid base64"),
        ({"image": 7, "boxes": [[1, 1, 5, 5]]}, None, 422, "'image' must be a base64 string"),
        ({"image": b64(IMAGE), "boxes": {"a": 1}}, None, 422, "'boxes' must be a list, got dict"),
        ({"image": b64(IMAGE), "boxes": [[float("nan"), 1, 5, 5]]}, None, 422, "box 0 has a non-finite value: [nan, 1, 5, 5]"),
        ({"image": b64(IMAGE), "boxes": [[1, 1, 5]]}, None, 422, "box 0 is not four numbers [x0, y0, x1, y1]: [1, 1, 5]"),
        ({"image": b64(IMAGE), "boxes": [[1, 1, 500, 5]]}, None, 422, "box 0 [1, 1, 500, 5] is outside the 128x128 image"),
        ({"image": b64(IMAGE), "boxes": []}, None, 422, "no boxes: give at least one box"),
        ({"image": "garbage", "boxes": [[1, 1, 5, 5]] * 10_000}, None, 422, "10000 boxes is more than one request takes (8; see --max_regions)"),
        ({"boxes": [[1, 1, 5, 5]]}, b"", 422, "no image: the image is empty (0 bytes)"),
        ({"boxes": [[1, 1, 5, 5]]}, IMAGE[:300], 422, "the image could not be read (OSError: image file is truncated"),
        ({"boxes": [[1, 1, 5, 5]]}, b"GIF89a nonsense", 422, "the file is not an image this server can read"),
        ({"boxes": [[1, 1, 5, 5]]}, bomb_png(5_000, 5_000), 422, "the image is too large: 5000x5000 pixels (at most 1,000,000 pixels)"),
        ({"boxes": [[1, 1, 5, 5]]}, bomb_png(50_000, 50_000), 422, "the image is too large: 2,500,000,000 pixels (at most 1,000,000 pixels)"),
        ({"boxes": [[1, 1, 5, 5]], "ids": [1, 2]}, IMAGE, 422, "'ids' has 2 entries for 1 boxes"),
        ({"boxes": [[1, 1, 5, 5], [1, 1, 6, 6]], "ids": ["a", "a"]}, IMAGE, 422, "'ids' must be distinct strings or integers"),
        ({"boxes": [[1, 1, 5, 5]], "masks": [{"size": [64, 64], "counts": "PP"}]}, IMAGE, 422, "mask 0: the RLE mask is 64x64 (size [h, w] = [64, 64]) but the image is 128x128"),
        ({"boxes": [[1, 1, 5, 5]], "masks": [{"size": [128, 128], "counts": [10, 999999]}]}, IMAGE, 422, "mask 0: the RLE mask's runs cover 1000009 pixels, not the image's 16384"),
        ({"boxes": [[1, 1, 5, 5]], "masks": [[[1, 2, 3]]]}, IMAGE, 422, "mask 0: polygon 0 has 3 coordinates"),
        ({"detections": [{"bbox": [1, 1, 0, 5], "score": 0.9}]}, IMAGE, 422, "'detections': detection 0: 'bbox' [x, y, w, h] has w <= 0: [1, 1, 0, 5]"),
        ({"detections": [{"bbox": [1, 1, 4, 4], "score": "high"}]}, IMAGE, 422, "'detections': detection 0: 'score' is not a finite number: 'high'"),
        ({"detections": [{"bbox": [1, 1, 4, 4]}] * 9}, IMAGE, 422, "9 detections are kept, more than one request takes (8; use 'top_k' or 'score_threshold')"),
    ],
)
def test_bad_requests_are_one_line_errors_with_their_status(fields, image_bytes, status, expected):
    with pytest.raises(RequestError) as err:
        check_request(fields, image_bytes, LIMITS)
    assert err.value.status == status and str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_bodies_that_are_not_json_objects():
    for body, expected in ((b"{not json", "the body is not JSON (Expecting property name"), (b"[1, 2]", "the body must be a JSON object"), (b"\xff\xfe", "the body is not JSON")):
        with pytest.raises(RequestError) as err:
            parse_json_body(body)
        assert err.value.status == 400 and str(err.value).startswith(expected)


def test_a_good_request_becomes_the_canonical_one():
    image, boxes, fields = scene_request(0, 2)
    request = check_request(dict(fields, ids=["a", 7]), None, LIMITS)
    assert (request["width"], request["height"]) == (128, 128) and base64.b64decode(request["image"]) == png(image)
    assert request["regions"] == [{"id": "a", "box": boxes[0], "mask": None}, {"id": 7, "box": boxes[1], "mask": None}]
    # detections: scored, thresholded, the best top_k first, clamped when they stick out a pixel
    detections = [{"bbox": [0, 0, 10, 10], "score": 0.2}, {"bbox": [-1, 5, 20, 20], "score": 0.9, "category_id": 3}, {"bbox": [5, 5, 5, 5], "score": 0.6}]
    request = check_request({"image": fields["image"], "detections": detections, "score_threshold": 0.5, "top_k": 1}, None, LIMITS)
    assert request["regions"] == [{"id": 1, "box": [0.0, 5.0, 19.0, 25.0], "mask": None, "detector_score": 0.9, "detector_category_id": 3}]
    detections_only_low = check_request({"image": fields["image"], "detections": detections, "score_threshold": 0.95}, None, LIMITS)
    assert detections_only_low["regions"] == []  # a detector that found nothing is an answer, not an error


# ---------------------------------------------------------------- a real server on loopback

MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def server(stage2_checkpoint, tmp_path_factory):
    """``fineregion-pl serve`` on a free loopback port, batching up to 8 requests waiting up to 0.3 s."""
    pytest.importorskip("litserve", reason='the serve extra is not installed (pip install -e ".[serve]")')
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    process = VerbProcess(["serve", "--ckpt_path", str(stage2_checkpoint), "--port", str(port), "--device", "cpu", "--max_batch_size", "8",
                           "--batch_timeout", "0.3", "--max_regions", "16", "--max_body_bytes", str(MAX_BODY)], folder / "serve.log")
    try:
        process.wait_for(r"serving on http://127\.0\.0\.1:\d+/")
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def captioner(stage2_checkpoint):
    from fineregion_pl.api import RegionCaptioner

    return RegionCaptioner.from_checkpoint(stage2_checkpoint)


@pytest.mark.slow
def test_malformed_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(server, captioner):
    import requests

    process, url = server
    image, boxes, good = scene_request(0, 2)
    assert requests.get(f"{url}/health", timeout=10).text == "ok"
    json_type = {"Content-Type": "application/json"}
    bad = {
        "wrong JSON": dict(data=b'{"image": "abc", "boxes": [[1, 2', headers=json_type),
        "a JSON list": dict(json=[good]),
        "missing image": dict(json={"boxes": boxes}),
        "missing boxes": dict(json={"image": good["image"]}),
        "NaN box": dict(data=json.dumps({"image": good["image"], "boxes": [[float("nan"), 1, 2, 3]]}).encode(), headers=json_type),
        "10,000 boxes": dict(json={"image": good["image"], "boxes": [[1, 1, 5, 5]] * 10_000}),
        "0-byte image": dict(files={"image": ("a.png", b"", "image/png")}, data={"boxes": json.dumps(boxes)}),
        "truncated image": dict(files={"image": ("a.png", png(image)[:300], "image/png")}, data={"boxes": json.dumps(boxes)}),
        "decompression bomb": dict(json={"image": b64(bomb_png(60_000, 60_000)), "boxes": boxes}),
        "wrong content type": dict(data=b"image=abc", headers={"Content-Type": "text/plain"}),
        "no content type": dict(data=b"{}"),
        "huge body": dict(data=b"0" * (MAX_BODY + 1), headers=json_type),
        "garbled multipart": dict(data=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=x"}),
        "a box field that is not JSON": dict(files={"image": ("a.png", png(image), "image/png")}, data={"boxes": "[[1, 2"}),
        "a mask of another size": dict(json=dict(good, masks=[rle_of(np.ones((10, 10))), None])),
    }
    answers = {name: requests.post(f"{url}/predict", timeout=60, **kwargs) for name, kwargs in bad.items()}
    for name, answer in answers.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        message = answer.json()["error"]
        assert isinstance(message, str) and message and "\n" not in message, (name, answer.text)
    assert {name: a.status_code for name, a in answers.items() if a.status_code != 422} == {
        "wrong JSON": 400, "a JSON list": 400, "wrong content type": 415, "no content type": 415, "huge body": 413}
    assert answers["10,000 boxes"].json()["error"] == "10000 boxes is more than one request takes (16; see --max_regions)"
    assert answers["decompression bomb"].json()["error"] == "the image is too large: 3,600,000,000 pixels (at most 40,000,000 pixels)"
    assert requests.get(f"{url}/predict", timeout=10).status_code == 405
    # still serving: the same image as JSON and as a multipart upload
    expected = captioner.describe(image, boxes)
    for answer in (requests.post(f"{url}/predict", json=good, timeout=60),
                   requests.post(f"{url}/predict", files={"image": ("a.png", png(image), "image/png")}, data={"boxes": json.dumps(boxes)}, timeout=60)):
        assert answer.status_code == 200, answer.text
        regions = answer.json()["regions"]
        assert [r["caption"] for r in regions] == [r["caption"] for r in expected]
        assert [r["category"] for r in regions] == [r["category"] for r in expected] and [r["score"] for r in regions] == [r["score"] for r in expected]
    assert process.alive()


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_give_the_captions_of_describe_detections_and_masks_too(server, captioner):
    import requests

    _, url = server
    cases = [scene_request(i, 3) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: requests.post(f"{url}/predict", json=case[2], timeout=120), cases))
    assert [a.status_code for a in answers] == [200] * 8
    assert max(a.json()["batch_size"] for a in answers) > 1  # LitServe put several clients' requests in one model call
    for (image, boxes, _), answer in zip(cases, answers):
        assert [r["caption"] for r in answer.json()["regions"]] == [r["caption"] for r in captioner.describe(image, boxes)]

    # a detector's output in the COCO results format, and a mask for one region
    image, record = make_scene(0, "test", 3)
    detections = [{"bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9 - 0.1 * i, "category_id": 10 + i} for i, (x0, y0, x1, y1) in enumerate(r["box"] for r in record["regions"])]
    answer = requests.post(f"{url}/predict", json={"image": b64(png(image)), "detections": detections, "score_threshold": 0.75, "top_k": 5}, timeout=60).json()
    kept = [d for d in detections if d["score"] >= 0.75]
    assert [r["region_id"] for r in answer["regions"]] == list(range(len(kept))) and [r["detector_category_id"] for r in answer["regions"]] == [d["category_id"] for d in kept]
    assert [r["caption"] for r in answer["regions"]] == [r["caption"] for r in captioner.describe_detections(image, detections, 0.75, 5)]
    x0, y0, x1, y1 = (round(v) for v in record["regions"][0]["box"])
    mask = np.zeros((128, 128))
    mask[y0:(y0 + y1) // 2, x0:x1] = 1  # the top half of the box
    masks = [rle_of(mask), None]
    boxes = [r["box"] for r in record["regions"][:2]]
    answer = requests.post(f"{url}/predict", json={"image": b64(png(image)), "boxes": boxes, "masks": masks}, timeout=60).json()
    assert [r["mask"] for r in answer["regions"]] == [True, False]
    assert [r["caption"] for r in answer["regions"]] == [r["caption"] for r in captioner.describe(image, boxes, masks=masks)]
