"""Regions from a detector's COCO results and from masks: parsing, checks, and what the captioner does with them."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fineregion_pl.model.detections import check_segmentation, regions_from_detections, rle_string_counts
from fineregion_pl.model.errors import BadInputError


def runs_of(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel == value:
            count += 1
        else:
            runs.append(count)
            value, count = pixel, 1
    return runs + [count]


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


@pytest.mark.parametrize("seed", range(6))
def test_compressed_rle_strings_decode_to_the_runs_of_the_mask(seed):
    rng = np.random.default_rng(seed)
    mask = (rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()).astype(np.uint8)
    assert rle_string_counts(rle(mask)["counts"]) == runs_of(mask)
    assert check_segmentation(rle(mask), mask.shape[1], mask.shape[0], "r") == rle(mask)


def test_malformed_masks_are_refused_before_pycocotools_reads_them():
    good = rle(np.ones((4, 5)))
    with pytest.raises(BadInputError, match="r: the RLE mask's runs cover 40 pixels, not the image's 20"):
        check_segmentation({"size": [4, 5], "counts": [0, 40]}, 5, 4, "r")  # decoding this would write past the mask
    with pytest.raises(BadInputError, match="the counts string ends inside a number"):
        check_segmentation({"size": [4, 5], "counts": good["counts"] + "o"}, 5, 4, "r")
    with pytest.raises(BadInputError, match="is not part of a COCO RLE string"):
        check_segmentation({"size": [4, 5], "counts": "\x01"}, 5, 4, "r")
    with pytest.raises(BadInputError, match=r"r: the RLE mask is 5x4 \(size \[h, w\] = \[4, 5\]\) but the image is 4x5"):
        check_segmentation(good, 4, 5, "r")
    with pytest.raises(BadInputError, match="needs 'size'"):
        check_segmentation({"counts": good["counts"]}, 5, 4, "r")
    with pytest.raises(BadInputError, match="polygon 1 has a non-finite coordinate"):
        check_segmentation([[0, 0, 1, 0, 1, 1], [0, 0, float("inf"), 0, 1, 1]], 5, 4, "r")
    with pytest.raises(BadInputError, match="a mask must be a COCO RLE"):
        check_segmentation("a mask", 5, 4, "r")
    assert check_segmentation(None, 5, 4, "r") is None and check_segmentation([], 5, 4, "r") is None


def test_detections_are_thresholded_ranked_and_cut_to_top_k():
    detections = [
        {"bbox": [0, 0, 10, 10], "score": 0.3, "category_id": 1},
        {"bbox": [5, 5, 10, 20], "score": 0.9, "category_id": 2},
        {"bbox": [1, 1, 2, 2], "score": 0.6},
        {"bbox": [2, 2, 3, 3], "score": 0.6, "category_id": 4},
    ]
    regions = regions_from_detections(detections, "d.json", score_threshold=0.5, top_k=2)
    assert [(r["id"], r["box"], r["detector_score"], r["detector_category_id"]) for r in regions] == [(1, [5, 5, 15, 25], 0.9, 2), (2, [1, 1, 3, 3], 0.6, None)]
    assert [r["id"] for r in regions_from_detections(detections, "d.json")] == [1, 2, 3, 0]  # ties keep the file's order
    # a segmentation without a box: the box is the mask's
    mask = np.zeros((20, 30))
    mask[4:9, 10:22] = 1
    (region,) = regions_from_detections([{"segmentation": rle(mask), "score": 0.7}], "d.json", 30, 20)
    assert region["box"] == [10, 4, 22, 9] and region["segmentation"] == rle(mask)


@pytest.mark.parametrize(
    "detection, message",
    [
        ({"bbox": [0, 0, 10], "score": 1}, "d.json detection 0: 'bbox' is not four numbers [x, y, w, h]: [0, 0, 10]"),
        ({"bbox": [0, 0, -1, 10]}, "d.json detection 0: 'bbox' [x, y, w, h] has w <= 0"),
        ({"bbox": [0, 0, 1, 1], "score": float("nan")}, "d.json detection 0: 'score' is not a finite number: nan"),
        ({"score": 1}, "d.json detection 0 has neither 'bbox' [x, y, w, h] nor 'segmentation'"),
        ("box", "d.json detection 0 is not an object"),
        ({"bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}, "d.json detection 0 has a segmentation but the image size is not known"),
    ],
)
def test_malformed_detections_are_one_line_errors_naming_them(detection, message):
    with pytest.raises(BadInputError) as err:
        regions_from_detections([detection], "d.json")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(BadInputError, match="top_k must be a positive integer"):
        regions_from_detections([], "d.json", top_k=0)


@pytest.fixture(scope="module")
def captioner(stage2_checkpoint):
    from fineregion_pl.api import RegionCaptioner

    return RegionCaptioner.from_checkpoint(stage2_checkpoint)


def test_masks_are_pooled_and_detections_described_with_their_detector_fields(captioner):
    import torch

    from fineregion_pl.data.synthetic import make_scene

    image, record = make_scene(0, "test", 0)
    boxes = [r["box"] for r in record["regions"][:2]]
    x0, y0, x1, y1 = (round(v) for v in boxes[0])
    half = np.zeros((128, 128))
    half[y0:(y0 + y1) // 2, x0:x1] = 1
    features = {}
    original = captioner.vision.forward

    def spy(*args, **kwargs):  # the pooled region features z of the last forward
        out = original(*args, **kwargs)
        features["z"] = out.regions.z.detach().clone()
        return out

    captioner.vision.forward = spy
    try:
        plain = captioner.describe(image, boxes)
        z_plain = features["z"]
        assert captioner.describe(image, boxes, masks=[None, None]) == plain
        assert torch.equal(features["z"], z_plain)  # no mask given: the box pooling, exactly
        captioner.describe(image, boxes, masks=[rle(half), None])
        z_masked = features["z"]
    finally:
        captioner.vision.forward = original
    assert not torch.allclose(z_masked[0, 0], z_plain[0, 0])
    # the region without a mask pools the same; to float rounding, as a batch with a mask takes the dense path
    torch.testing.assert_close(z_masked[0, 1], z_plain[0, 1], atol=1e-5, rtol=0)
    with pytest.raises(BadInputError, match="image 0 region 0: the RLE mask is 10x10"):
        captioner.describe(image, boxes, masks=[rle(np.ones((10, 10))), None])

    detections = [{"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s, "category_id": c} for b, s, c in zip(boxes, (0.4, 0.8), (7, 9))]
    rows = captioner.describe_detections(image, detections, score_threshold=0.3)
    assert [(r["region_id"], r["detector_score"], r["detector_category_id"]) for r in rows] == [(1, 0.8, 9), (0, 0.4, 7)]
    assert [r["caption"] for r in rows] == [r["caption"] for r in captioner.describe(image, boxes[::-1], ids=[1, 0])]
    assert captioner.describe_detections(image, detections, score_threshold=0.9) == []
