"""Dynamic masking perturbations and segmentation masks on the model path."""

from __future__ import annotations

import torch
from conftest import tiny_encoder_config
from PIL import Image

from fineregion_pl.model.dynamic_masking import DynamicMasking, morph_masks, perturb_boxes
from fineregion_pl.model.transforms import letterbox_segmentation, to_region_sample
from fineregion_pl.model.vision_model import RegionVisionModel


def test_box_perturbation_stays_near_the_box_and_is_seeded():
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 50.0]]]).expand(1, 500, 4)
    config = DynamicMasking(box_jitter=0.1, box_scale=0.2)
    a = perturb_boxes(boxes, config, torch.Generator().manual_seed(0))
    b = perturb_boxes(boxes, config, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, boxes)
    width = a[..., 2] - a[..., 0]
    assert width.min() >= 20 * 0.8 * 0.8 - 1e-4 and width.max() <= 20 * 1.2 * 1.2 + 1e-4  # jitter then scale
    assert (a[..., 0] - 10).abs().max() <= 20 * 0.1 + 20 * 1.2 * 0.2 / 2 + 1e-4


def test_mask_morph_dilates_or_erodes_by_one_cell_and_never_empties():
    masks = torch.zeros(1, 400, 8, 8)
    masks[..., 2:5, 2:5] = 1.0
    masks[0, 0] = 0.0
    masks[0, 0, 3, 3] = 1.0  # a one-cell mask cannot be eroded away
    out = morph_masks(masks, DynamicMasking(mask_morph=0.4), torch.Generator().manual_seed(0))
    sums = out[0, 1:].sum((-2, -1))
    assert set(sums.tolist()) == {9.0, 25.0, 1.0}  # unchanged 3x3, dilated 5x5, eroded to the centre
    assert out[0, 0].sum() >= 1
    assert torch.equal(morph_masks(masks, DynamicMasking(mask_morph=0.0)), masks)


def test_polygon_segmentations_follow_the_letterbox_and_rle_is_resized():
    polygon = [[0, 0, 100, 0, 0, 50]]
    assert letterbox_segmentation(polygon, 0.5, 64) == [[0.0, 0.0, 50.0, 0.0, 0.0, 25.0]]
    import numpy as np
    from pycocotools import mask as mask_utils

    full = np.zeros((40, 80), dtype=np.uint8)
    full[:20, :40] = 1
    rle = mask_utils.encode(np.asfortranarray(full))
    rle["counts"] = rle["counts"].decode()
    scaled = letterbox_segmentation(rle, 0.5, 64)
    decoded = mask_utils.decode({"size": scaled["size"], "counts": scaled["counts"].encode()})
    assert decoded.shape == (64, 64) and decoded.sum() == 10 * 20 and decoded[:10, :20].all()
    record = {"image_id": 1, "width": 80, "height": 40, "regions": [{"id": 0, "box": [0, 0, 40, 20], "captions": ["x"], "segmentation": polygon}]}
    sample = to_region_sample(Image.new("RGB", (80, 40)), record, 64, 8, train=False)
    assert sample.segmentations == [[[0.0, 0.0, 80.0, 0.0, 0.0, 40.0]]]


def test_the_model_pools_a_segmentation_where_given_and_the_box_elsewhere():
    torch.manual_seed(0)
    model = RegionVisionModel(tiny_encoder_config(), num_classes=5).eval()
    images = torch.randn(1, 3, 64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    triangle = [[[0, 0, 32, 0, 0, 32]], None]
    with torch.no_grad():
        plain = model(images, boxes, valid, "dynamic")
        seg = model(images, boxes, valid, "dynamic", segmentations=[triangle])
    finest = seg.regions.masks[0]
    assert finest[0, 0].sum() < plain.regions.masks[0][0, 0].sum() * 0.6  # half the box
    assert torch.equal(finest[0, 1], plain.regions.masks[0][0, 1])  # no segmentation: the box mask
    assert not torch.allclose(seg.regions.z[0, 0], plain.regions.z[0, 0]) and torch.allclose(seg.regions.z[0, 1], plain.regions.z[0, 1])
    assert seg.target_masks[0, 0].sum() < plain.target_masks[0, 0].sum()
