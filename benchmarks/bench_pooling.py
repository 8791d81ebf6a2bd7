"""Region pooling: the model's own path against the ways others pool regions.

Ours is the model's own pooling, ``RegionEncoder.pool(features, boxes, image_size, hard=False)``
(what ``RegionVisionModel.forward`` calls, for training and inference alike), called on a real
``RegionEncoder`` (a tiny one: ``pool`` does not use the backbone, only the feature maps it is
given). On the CPU, for these boxes, that is the compiled loop over the cells under each box
(``model/box_pool_kernel.py``, all levels in one call, no masks built); the dense path it replaces
here (per level ``box_masks``, soft cell coverage, eq. 2, and ``masked_mean``, eqs. 3-4 fused into one
batched matmul) is timed beside it and is what the model runs on a GPU, under mask perturbations and
for segmentations. Baselines, each an honest plain implementation:

- per-region loop, crop: for each image and region, crop the cells the box touches, weight them by
  the box's coverage of each cell, average (same numbers as ours; the fast naive way);
- per-region loop, mask: for each image and region, ``F ⊙ M_i`` then sum / ``sum(M_i)`` (eq. 3
  literally; same numbers as ours);
- torchvision ``roi_align`` to 1x1 (``aligned=True``, adaptive sampling), NCHW input prepared
  outside the timed region;
- Osprey's ``MaskPooling``, image by image: rasterise each region's mask at full resolution,
  ``F.interpolate`` it (bilinear) to every level, threshold ``> 0``, normalise, ``einsum``.

Float32, the default torch threads, no autograd. Boxes: centres uniform in the image, each side
``384 * exp(U(log 0.05, log 0.9))`` clipped to the image (COCO-like spread of sizes).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import matmul, median, median_ratio, peak_memory_bytes, row, tensor_copy, time_interleaved  # noqa: E402
from fineregion_pl.model.box_integrals import (  # noqa: E402
    INTEGRAL_MIN_REGION_ROWS,
    INTEGRAL_MIN_ROW_VALUES,
    INTEGRAL_MIN_ROWS,
    box_means,
    integrals_faster,
    pool_levels,
)
from fineregion_pl.model.box_pool_kernel import box_pool  # noqa: E402
from fineregion_pl.model.boxes import sanitize_boxes  # noqa: E402
from fineregion_pl.model.encoder import EncoderConfig, RegionEncoder  # noqa: E402
from fineregion_pl.model.region_masks import box_masks, masked_mean  # noqa: E402


def random_boxes(generator: torch.Generator, batch: int, regions: int, size: int) -> torch.Tensor:
    """``(B, N, 4)`` boxes in a ``size x size`` image with a wide, COCO-like spread of sizes."""
    centre = torch.rand(batch, regions, 2, generator=generator) * size
    low, high = math.log(0.05), math.log(0.9)
    side = size * torch.exp(torch.rand(batch, regions, 2, generator=generator) * (high - low) + low)
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=-1)
    boxes, _ = sanitize_boxes(boxes, torch.ones(batch, regions, dtype=torch.bool), size, size)
    return boxes


# ---------------------------------------------------------------- ours and the baselines


@functools.cache
def pooling_encoder() -> RegionEncoder:
    """A real ``RegionEncoder`` with mask pooling (the default) around a tiny Swin: ``pool`` pools the
    feature maps it is given, whatever their sizes, and never runs the backbone."""
    tiny = dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2, img_size=32)
    return EncoderConfig(backbone="swin_tiny_patch4_window7_224", feature_levels=[0, 1], backbone_kwargs=tiny).build().eval()


def path(features: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> str:
    """Which way ``RegionEncoder.pool`` takes for these inputs, in words."""
    if box_pool(features, boxes, image_size) is not None:
        return "the compiled per-box loop, model/box_pool_kernel.py"
    return "the dense masked matmul"


def ours(features: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``RegionEncoder.pool``, the model's own path for soft box masks: ``(z, masks)``."""
    return pooling_encoder().pool(features, boxes, image_size, hard=False)


def dense(features: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The dense path: every level's soft box masks and one batched matmul per level (``pool_levels`` with masks)."""
    return pool_levels(features, boxes, image_size, [box_masks(boxes, image_size, f.shape[1:3]).to(f.dtype) for f in features])


def integrals(features: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The prefix-sum path on every level (``RegionEncoder.pool`` takes it per level, where
    ``h >= INTEGRAL_MIN_ROWS`` and ``N h >= INTEGRAL_MIN_REGION_ROWS``)."""
    return pool_levels(features, boxes, image_size)


def loop_crop(features: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Per image, per region: crop the touched cells, weight by coverage, average."""
    height, width = image_size
    b_count, n_count = boxes.shape[:2]
    out = torch.zeros(b_count, n_count, sum(f.shape[-1] for f in features))
    for b, image_boxes in enumerate(boxes.tolist()):
        for n, (x0, y0, x1, y1) in enumerate(image_boxes):
            start = 0
            for f in features:
                h, w, d = f.shape[1:]
                cell_h, cell_w = height / h, width / w
                i0, i1 = max(0, math.floor(y0 / cell_h)), min(h, math.ceil(y1 / cell_h))
                j0, j1 = max(0, math.floor(x0 / cell_w)), min(w, math.ceil(x1 / cell_w))
                if i1 > i0 and j1 > j0:
                    cover_y = torch.tensor([(min(y1, (i + 1) * cell_h) - max(y0, i * cell_h)) / cell_h for i in range(i0, i1)])
                    cover_x = torch.tensor([(min(x1, (j + 1) * cell_w) - max(x0, j * cell_w)) / cell_w for j in range(j0, j1)])
                    weight = torch.outer(cover_y, cover_x)
                    crop = f[b, i0:i1, j0:j1]
                    out[b, n, start:start + d] = (crop * weight[..., None]).sum((0, 1)) / weight.sum()
                start += d
    return out


def loop_mask(features: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Per image, per region: ``F ⊙ M_i`` summed and divided by ``sum(M_i)`` (eq. 3 literally)."""
    b_count, n_count = boxes.shape[:2]
    out = torch.zeros(b_count, n_count, sum(f.shape[-1] for f in features))
    for b in range(b_count):
        for n in range(n_count):
            parts = []
            for f in features:
                mask = box_masks(boxes[b, n][None, None], image_size, f.shape[1:3])[0, 0]
                total = mask.sum()
                parts.append((f[b] * mask[..., None]).sum((0, 1)) / total if total > 0 else f.new_zeros(f.shape[-1]))
            out[b, n] = torch.cat(parts)
    return out


def roi_align_pool(features_nchw: list[torch.Tensor], rois: torch.Tensor, shape: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """torchvision ``roi_align`` to 1x1 on every level, concatenated to ``(B, N, D)``."""
    from torchvision.ops import roi_align

    width = image_size[1]
    pooled = [
        roi_align(f, rois, output_size=1, spatial_scale=f.shape[-1] / width, sampling_ratio=-1, aligned=True).reshape(*shape, -1)
        for f in features_nchw
    ]
    return torch.cat(pooled, dim=-1)


def osprey_pool(features_nchw: list[torch.Tensor], boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Osprey's MaskExtractor/MaskPooling, image by image, from full-resolution region masks."""
    height, width = image_size
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    per_image = []
    for b in range(boxes.shape[0]):
        x0, y0, x1, y1 = (boxes[b, :, k, None, None] for k in range(4))
        mask = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).float()[None]  # (1, N, H, W) rasterised
        pooled = []
        for f in features_nchw:
            x = f[b:b + 1]
            m = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
            m = (m > 0).to(m.dtype)
            denorm = m.sum(dim=(-1, -2), keepdim=True) + 1e-8
            pooled.append(torch.einsum("bchw,bqhw->bqc", x, m / denorm))
        per_image.append(torch.cat(pooled, dim=-1))
    return torch.cat(per_image)


# ---------------------------------------------------------------- the figures


def _pooling_flops(batch: int, regions: int, features: list[torch.Tensor]) -> float:
    return float(sum(2 * batch * regions * f.shape[1] * f.shape[2] * f.shape[3] for f in features))


def against_baselines(quick: bool) -> list[dict]:
    """Figure 1: B=8, N=32, 384 px, levels 24x24x512 and 12x12x1024."""
    batch, regions, size = (2, 4, 64) if quick else (8, 32, 384)
    levels = [(8, 16), (4, 32)] if quick else [(24, 512), (12, 1024)]
    rounds = 2 if quick else 15
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(generator, batch, regions, size)
    features = [torch.randn(batch, s, s, d, generator=generator) for s, d in levels]
    features_nchw = [f.permute(0, 3, 1, 2).contiguous() for f in features]
    rois = torch.cat([torch.arange(batch).repeat_interleave(regions)[:, None].float(), boxes.reshape(-1, 4)], dim=1)
    image_size = (size, size)
    flops = _pooling_flops(batch, regions, features)
    big_mm, big_mm_flops = matmul(256 if quick else 1536)
    bmm_inputs = [(box_masks(boxes, image_size, f.shape[1:3]).reshape(batch, regions, -1), f.reshape(batch, -1, f.shape[-1])) for f in features]

    with torch.no_grad():
        reference = ours(features, boxes, image_size)[0]
        for name, other in [("loop_crop", loop_crop(features, boxes, image_size)), ("loop_mask", loop_mask(features, boxes, image_size)),
                            ("integrals", integrals(features, boxes, image_size)), ("dense", dense(features, boxes, image_size))]:
            if not torch.allclose(reference, other, atol=1e-4, rtol=1e-4):
                raise AssertionError(f"bench_pooling: baseline {name} disagrees with ours by {(reference - other).abs().max():.3g}")
        times = time_interleaved({
            "ours": lambda: ours(features, boxes, image_size),
            "dense": lambda: dense(features, boxes, image_size),
            "integrals": lambda: integrals(features, boxes, image_size),
            "loop_crop": lambda: loop_crop(features, boxes, image_size),
            "loop_mask": lambda: loop_mask(features, boxes, image_size),
            "roi_align": lambda: roi_align_pool(features_nchw, rois, (batch, regions), image_size),
            "mm": big_mm,
            "bmm_only": lambda: [torch.bmm(m, f) for m, f in bmm_inputs],
        }, rounds=rounds)
        peak, retained, (z, masks) = peak_memory_bytes(lambda: ours(features, boxes, image_size))

    t_ours = median(times["ours"])
    mm_rate = [big_mm_flops / t for t in times["mm"]]
    ours_rate = [flops / t for t in times["ours"]]  # dense-equivalent: the work the dense matmul would do, per our time
    dense_rate = [flops / t for t in times["dense"]]
    efficiency = median([o / m for o, m in zip(ours_rate, mm_rate)])
    dense_efficiency = median([o / m for o, m in zip(dense_rate, mm_rate)])
    bmm_rate = median([flops / t for t in times["bmm_only"]])
    rest = median([o - b for o, b in zip(times["dense"], times["bmm_only"])])
    masks_built = isinstance(masks, list)  # the kernel's path builds masks only when read (LazyBoxMasks)
    output_bytes = z.numel() * z.element_size() + (sum(m.numel() * m.element_size() for m in masks) if masks_built else 0)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).mean().item() / size**2
    sizes = f"B={batch} N={regions} {size}px levels " + " + ".join(f"{s}x{s}x{d}" for s, d in levels)
    common = (f"{sizes}; boxes cover {area:.0%} of the image on average; ours {t_ours * 1e3:.2f} ms ({path(features, boxes, image_size)}; "
              f"the dense path {median(times['dense']) * 1e3:.2f} ms, streamed row prefix sums on every level "
              f"{median(times['integrals']) * 1e3:.2f} ms; median of {rounds} interleaved rounds)")
    rows = []
    for key, label, how in [
        ("loop_crop", "crop", "crops the touched cells, weights them by coverage"),
        ("loop_mask", "mask", "forms F*M_i on all cells (eq. 3 literally)"),
    ]:
        speedup = median_ratio(times[key], times["ours"])
        best = median([t_loop / (flops / rate) for t_loop, rate in zip(times[key], mm_rate)])
        per_item = median(times[key]) / (batch * regions * len(levels))
        note = (f"{common}; loop {median(times[key]) * 1e3:.1f} ms ({per_item * 1e6:.0f} us per region and level): per image and "
                f"region it {how}; same output as ours (checked)")
        if speedup < 20:
            feature_bytes = sum(f.numel() * f.element_size() for f in features)
            note += (f". Unmet: 20x needs {median(times[key]) / 20 * 1e3:.2f} ms; ours streams the {feature_bytes / 1e6:.0f} MB of "
                     f"features at {feature_bytes / t_ours / 1e9:.1f} GB/s, summing only the cells under the boxes (the dense matmul at "
                     f"this run's square-mm rate would be {best:.1f}x)")
        rows.append(row("pooling", f"speed-up vs per-region loop ({label})", speedup, ">= 20x", speedup >= 20, note))
    speedup = median_ratio(times["roi_align"], times["ours"])
    note = (f"{common}; roi_align {median(times['roi_align']) * 1e3:.1f} ms (1x1, aligned=True, sampling_ratio=-1, "
            f"NCHW made outside the timer)")
    if speedup < 2:
        note += f". Unmet: roi_align samples only inside each box (~{area:.0%} of the cells)"
    rows.append(row("pooling", "speed-up vs torchvision roi_align", speedup, ">= 2x", speedup >= 2, note))
    note = (f"the dense matmul's {flops / 1e6:.0f} MFLOP per our time: {median(ours_rate) / 1e9:.1f} GFLOP/s (the loop does a share "
            f"of that work, the cells under the boxes); the dense path itself (the model's on a GPU, under mask perturbations, "
            f"for segmentations) runs at {median(dense_rate) / 1e9:.1f} GFLOP/s, {dense_efficiency:.2f} of the square-mm rate; vs {median(mm_rate) / 1e9:.1f} "
            f"GFLOP/s for a {'256' if quick else '1536'}^3 torch.mm in the same rounds (median of per-round ratios); "
            f"the two bmm alone (masks made outside) run at {bmm_rate / 1e9:.1f} GFLOP/s; making the masks and normalising "
            f"take the other {rest * 1e3:.2f} ms")
    if efficiency < 0.4:
        note += (f". Unmet: the dense path's batched matmul of these shapes (M = {regions} regions per image) runs at "
                 f"{bmm_rate / median(mm_rate):.0%} of the square-mm rate")
    rows.append(row("pooling", "share of the machine's matmul rate (dense-equivalent FLOPs / our time)", efficiency, ">= 0.40", efficiency >= 0.4, note))
    ratio = peak / output_bytes
    note = (f"peak {peak / 1e6:.2f} MB allocated during the op (torch.profiler profile_memory: running sum of the CPU "
            f"allocator's alloc/free events) vs outputs {'+ masks ' if masks_built else '(no masks: built only if read) '}{output_bytes / 1e6:.2f} MB; "
            f"still held after: {retained / 1e6:.2f} MB")
    if ratio > 1.5:
        z_bytes = z.numel() * z.element_size()
        note += (f". Unmet: z ({z_bytes / 1e6:.2f} MB) is preallocated and each level written into it, so what is left "
                 f"above the outputs is one level's pooled tensor and the bmm's own buffers")
    rows.append(row("pooling", "peak extra memory / (outputs + masks)", ratio, "<= 1.5", ratio <= 1.5, note))
    return rows


def against_osprey(quick: bool) -> list[dict]:
    """Figure 2: Osprey's way on B=8, N=32, 384 px, four levels."""
    batch, regions, size = (2, 4, 64) if quick else (8, 32, 384)
    levels = [(16, 8), (8, 16), (4, 32), (2, 64)] if quick else [(96, 192), (48, 384), (24, 768), (12, 1536)]
    rounds = 2 if quick else 7
    generator = torch.Generator().manual_seed(1)
    boxes = random_boxes(generator, batch, regions, size)
    features = [torch.randn(batch, s, s, d, generator=generator) for s, d in levels]
    features_nchw = [f.permute(0, 3, 1, 2).contiguous() for f in features]
    image_size = (size, size)
    flops = _pooling_flops(batch, regions, features)
    feature_bytes = float(sum(f.numel() * f.element_size() for f in features))
    big_mm, big_mm_flops = matmul(256 if quick else 1536)
    copy, copy_bytes = tensor_copy(1 << 20 if quick else 128 << 20)
    bmm_inputs = [(box_masks(boxes, image_size, f.shape[1:3]).reshape(batch, regions, -1), f.reshape(batch, -1, f.shape[-1])) for f in features]

    with torch.no_grad():
        times = time_interleaved({
            "ours": lambda: ours(features, boxes, image_size),
            "dense": lambda: dense(features, boxes, image_size),
            "integrals": lambda: integrals(features, boxes, image_size),
            "osprey": lambda: osprey_pool(features_nchw, boxes, image_size),
            "mm": big_mm,
            "copy": copy,
            "bmm_only": lambda: [torch.bmm(m, f) for m, f in bmm_inputs],
        }, rounds=rounds)

    floors = [max(flops / (big_mm_flops / t_mm), feature_bytes / (copy_bytes / t_copy)) for t_mm, t_copy in zip(times["mm"], times["copy"])]
    mm_rate, copy_rate = median([big_mm_flops / t for t in times["mm"]]), median([copy_bytes / t for t in times["copy"]])
    sizes = f"B={batch} N={regions} {size}px levels " + " + ".join(f"{s}x{s}x{d}" for s, d in levels)
    t_ours, t_osprey = median(times["ours"]), median(times["osprey"])
    slowdown = median_ratio(times["osprey"], times["ours"])
    note = (f"{sizes}; Osprey's way {t_osprey * 1e3:.0f} ms vs ours {t_ours * 1e3:.1f} ms ({path(features, boxes, image_size)}; the dense "
            f"path {median(times['dense']) * 1e3:.1f} ms; median of {rounds} interleaved rounds)")
    if slowdown < 12:
        extra = median([o - b for o, b in zip(times["osprey"], times["bmm_only"])])
        note += (f". Unmet: Osprey's way is the dense matmul ({flops / 1e9:.2f} GFLOP, {median(times['bmm_only']) * 1e3:.0f} ms as plain "
                 f"bmm here) plus {extra * 1e3:.0f} ms of rasterising, resizing and per-image calls")
    rows = [row("osprey", "Osprey's pooling time / ours", slowdown, ">= 12x", slowdown >= 12, note)]
    over_floor = median_ratio(times["ours"], floors)
    note = (f"floor = max({flops / 1e9:.2f} GFLOP / {mm_rate / 1e9:.1f} GFLOP/s torch.mm, {feature_bytes / 1e6:.0f} MB of "
            f"features / {copy_rate / 1e9:.1f} GB/s copy traffic (read+write)) = {median(floors) * 1e3:.1f} ms, per round")
    bmm_rate = median([flops / t for t in times["bmm_only"]])
    note += (f"; ours reads the {feature_bytes / 1e6:.0f} MB of features at {feature_bytes / t_ours / 1e9:.1f} GB/s; the dense path "
             f"/ floor {median_ratio(times['dense'], floors):.2f} (its four bmm alone, masks made outside, at {bmm_rate / 1e9:.1f} GFLOP/s); "
             f"streamed row prefix sums on every level / floor {median_ratio(times['integrals'], floors):.2f}")
    if over_floor > 1.3:
        note += (". Unmet: the loop reads every feature row once, from memory (the square mm and the copy in between evict "
                 "them), and sums the cells under each box; the floor's FLOP term assumes the dense matmul at the square-mm rate")
    rows.append(row("osprey", "our time / floor", over_floor, "<= 1.3", over_floor <= 1.3, note))
    return rows


def prefix_sum_rule(quick: bool) -> list[dict]:
    """Figure 3: the per-level rule of ``RegionEncoder.pool`` (``integrals_faster``) against this
    machine: prefix sums / dense masked matmul, one level at a time, at several region counts."""
    batch, size, rounds = (2, 64, 2) if quick else (8, 384, 5)
    levels = [(48, 768), (8, 16)] if quick else [(96, 192), (48, 384), (24, 768), (12, 1536)]
    counts = [8, 128] if quick else [32, 64, 128, 256]
    generator = torch.Generator().manual_seed(2)
    table, picked, declined = [], [], []
    with torch.no_grad():
        for s, d in levels:
            f = torch.randn(batch, s, s, d, generator=generator)
            cells = []
            for n in counts:
                boxes = random_boxes(generator, batch, n, size)
                times = time_interleaved({"dense": lambda f=f, b=boxes, s=s: masked_mean(f, box_masks(b, (size, size), (s, s))),
                                          "prefix": lambda f=f, b=boxes: box_means(f, b, (size, size))}, rounds=rounds)
                ratio = median_ratio(times["prefix"], times["dense"])
                chosen = integrals_faster(f, n)
                (picked if chosen else declined).append(ratio)
                cells.append(f"N={n} {ratio:.2f}{'*' if chosen else ''}")
            table.append(f"{s}x{s}x{d}: " + ", ".join(cells))
    worst = max(picked) if picked else 0.0
    note = (f"prefix-sum time / dense time per level, B={batch}, median of {rounds} interleaved rounds ('*': the rule, h >= "
            f"{INTEGRAL_MIN_ROWS}, N h >= {INTEGRAL_MIN_REGION_ROWS} and B w d >= {INTEGRAL_MIN_ROW_VALUES}, picks prefix sums): "
            + "; ".join(table)
            + (f"; best declined {min(declined):.2f}" if declined else ""))
    if worst > 1.0:
        note += (". Unmet: the rule picks prefix sums where they are slower here; raise INTEGRAL_MIN_REGION_ROWS, "
                 "INTEGRAL_MIN_ROWS or INTEGRAL_MIN_ROW_VALUES (model/box_integrals.py)")
    return [row("pooling", "prefix-sum / dense time where the rule picks prefix sums (worst level)", worst, "<= 1.0", worst <= 1.0, note)]


def run(quick: bool = False) -> list[dict]:
    """Every pooling figure (``quick``: tiny sizes and 2 rounds, for a smoke test)."""
    return against_baselines(quick) + against_osprey(quick) + prefix_sum_rule(quick)


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
