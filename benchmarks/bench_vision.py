"""Regions are nearly free on the vision side: 32 regions per image cost little more than 1.

The backbone runs once per image whatever the number of regions; masks and pooling are one
batched matmul per level (see ``bench_pooling.py``). This benchmark times the whole vision side
of the quickstart at 1 and at 32 regions per image:

- eval (``torch.no_grad``, ``eval()``): ``RegionVisionModel.forward`` (what ``RegionCaptioner.encode``
  runs for prediction and evaluation): ``sanitize_boxes``, ``RegionEncoder.forward_features`` (Swin
  feature maps), ``RegionEncoder.pool`` (soft box masks on every level + masked pooling),
  ``RegionEncoder.context``, category head and region attention map; the backbone alone
  (``RegionEncoder.forward_features``) is timed in the same rounds, to show the regions' share;
- training: ``RegionVisionModel.forward`` in ``train()`` mode with dynamic masking (box jitter and
  scale as the quickstart, ``perturb_boxes`` / ``perturb_masks``), the stage-1 loss
  (cross-entropy + ``mask_loss``) and ``backward`` (no optimizer step: its cost does not depend on
  regions).

Encoder and dynamic masking: the quickstart's, read from ``configs/quickstart/stage1.yaml``
(``swin_tiny_patch4_window7_224`` with ``embed_dim 32, depths [2,2,2], heads [2,4,8], window 4,
img_size 128``, feature levels [0, 1, 2]: 32x32x32, 16x16x64, 8x8x128; box jitter and scale 0.05).
Batch of 8 images of 128 px; boxes with a COCO-like spread of sizes (``bench_pooling.random_boxes``);
the 1-region case uses the first box of each image. Float32, torch's default threads.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import median, median_ratio, row, time_interleaved  # noqa: E402
from benchmarks.bench_pooling import random_boxes  # noqa: E402
from fineregion_pl.model.dynamic_masking import DynamicMasking  # noqa: E402
from fineregion_pl.model.encoder import EncoderConfig  # noqa: E402
from fineregion_pl.model.losses import mask_loss  # noqa: E402
from fineregion_pl.model.vision_model import RegionVisionModel  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
TARGET = 1.25


def quickstart_init_args(stage: str) -> dict:
    """``model.init_args`` of ``configs/quickstart/<stage>.yaml`` (``stage1`` or ``stage2``)."""
    return yaml.safe_load((QUICKSTART / f"{stage}.yaml").read_text())["model"]["init_args"]


def quickstart_encoder(img_size: int = 128) -> EncoderConfig:
    """The quickstart's encoder (``configs/quickstart/stage1.yaml``), optionally at another input size."""
    encoder = copy.deepcopy(quickstart_init_args("stage1")["encoder"])
    encoder.setdefault("backbone_kwargs", {})["img_size"] = img_size
    return EncoderConfig(**encoder)


def run(quick: bool = False) -> list[dict]:
    batch, regions, size = (2, 4, 64) if quick else (8, 32, 128)
    rounds = 2 if quick else 15
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = RegionVisionModel(quickstart_encoder(size), num_classes=5)
    dynamic = DynamicMasking(**quickstart_init_args("stage1").get("dynamic", {}))
    images = torch.randn(batch, 3, size, size, generator=generator)
    all_boxes = random_boxes(generator, batch, regions, size)
    boxes = {1: all_boxes[:, :1].clone(), regions: all_boxes}
    valid = {n: torch.ones(batch, n, dtype=torch.bool) for n in boxes}
    categories = {n: torch.randint(0, 5, (batch, n), generator=generator) for n in boxes}

    def infer(n: int):
        with torch.no_grad():
            return model(images, boxes[n], valid[n], "dynamic")

    def backbone_only():
        with torch.no_grad():
            return model.encoder.forward_features(images)

    def train(n: int):
        out = model(images, boxes[n], valid[n], "dynamic", dynamic)
        loss = F.cross_entropy(out.logits.flatten(0, 1), categories[n].flatten()) + mask_loss(out.attn_logits, out.target_masks, out.region_valid)
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    model.eval()
    eval_times = time_interleaved({"1": lambda: infer(1), "N": lambda: infer(regions), "backbone": backbone_only}, rounds=rounds)
    model.train()
    train_times = time_interleaved({"1": lambda: train(1), "N": lambda: train(regions)}, rounds=rounds)

    levels = " + ".join(f"{f.shape[1]}x{f.shape[2]}x{f.shape[3]}" for f in backbone_only())
    sizes = f"B={batch} images of {size} px, quickstart Swin (levels {levels}), median of {rounds} interleaved rounds"
    rows = []
    ratio = median_ratio(eval_times["N"], eval_times["1"])
    pooling_share = median([(n - b) / n for n, b in zip(eval_times["N"], eval_times["backbone"])])
    note = (f"{sizes}; RegionVisionModel.forward in eval mode under no_grad: {median(eval_times['1']) * 1e3:.1f} ms with 1 region "
            f"per image, {median(eval_times['N']) * 1e3:.1f} ms with {regions}; the backbone alone (forward_features) "
            f"{median(eval_times['backbone']) * 1e3:.1f} ms, so masks + pooling + context + head + attention map of {regions} regions "
            f"are {pooling_share:.0%} of the total")
    if ratio > TARGET:
        note += (f". Unmet: the per-region work is {pooling_share:.0%} of the time next to this small backbone (embed_dim 32); "
                 "the 32x32 level's masks, pooling matmul and attention map grow with regions, the backbone does not")
    rows.append(row("vision", f"eval time, {regions} regions / 1 region per image", ratio, f"<= {TARGET}x", ratio <= TARGET, note))
    ratio = median_ratio(train_times["N"], train_times["1"])
    note = (f"{sizes}; RegionVisionModel.forward in train mode, dynamic masking (jitter {dynamic.box_jitter:g}, scale "
            f"{dynamic.box_scale:g}), category head, region "
            f"attention map, cross-entropy + L_mask, backward: {median(train_times['1']) * 1e3:.1f} ms with 1 region per image, "
            f"{median(train_times['N']) * 1e3:.1f} ms with {regions}")
    if ratio > TARGET:
        note += (". Unmet: besides pooling, the region attention map (B x N x 32x32 cells) and L_mask grow with regions "
                 "and backpropagate through the finest feature map")
    rows.append(row("vision", f"training fwd+bwd time, {regions} regions / 1", ratio, f"<= {TARGET}x", ratio <= TARGET, note))
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
