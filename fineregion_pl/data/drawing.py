"""Regions and their captions drawn on an image: one colour per region, labels on a solid band."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from fineregion_pl.model.transforms import IMAGENET_MEAN, IMAGENET_STD

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 225, 25), (128, 0, 0),
]


def picture_name(image_id: object, used: set[str]) -> str:
    """A file name for the picture of ``image_id`` that no other image of the run gets.

    The whole id is kept (so ``x.jpg`` and ``x.png`` give ``x.jpg.png`` and ``x.png.png``);
    characters unsafe in a file name become ``_`` and then a short hash of the id is added
    (``a b.jpg`` -> ``a_b.jpg-<8 hex>.png``, never ``a_b.jpg``'s name); a name already in ``used``
    (the same id twice) gets ``-2``, ``-3``... ``used`` is updated.
    """
    text = str(image_id)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip(".") or "image"
    if safe != text:
        safe += "-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    name, number = f"{safe}.png", 1
    while name in used:
        number += 1
        name = f"{safe}-{number}.png"
    used.add(name)
    return name


def model_input_to_image(image: torch.Tensor, scale: float, size: Sequence[int]) -> Image.Image:
    """Undo normalisation and letterboxing of a ``(3, S, S)`` model input: the image at ``size`` (w, h)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    width, height = int(size[0]), int(size[1])
    content = Image.fromarray(pixels).crop((0, 0, max(1, round(width * scale)), max(1, round(height * scale))))
    return content.resize((width, height), Image.BICUBIC)


def draw_regions(image: Image.Image, regions: Sequence[dict], min_side: int = 512) -> Image.Image:
    """Draw each region's box and ``caption`` (with ``category`` and ``score`` when present).

    ``regions`` are dicts with ``box`` (xyxy pixels of ``image``) and ``caption``. Small images are
    upscaled to ``min_side`` first so the text stays legible.
    """
    factor = max(1.0, min_side / max(image.size))
    canvas = image.convert("RGB").resize((round(image.width * factor), round(image.height * factor)), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 40)))
    line = max(2, round(min(canvas.size) / 200))
    for index, region in enumerate(regions):
        colour = PALETTE[index % len(PALETTE)]
        x0, y0, x1, y1 = (v * factor for v in region["box"])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        label = region.get("caption", "")
        if region.get("category") is not None:
            label += f"  [{region['category']} {region.get('score', 0):.2f}]"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tx, ty = x0, max(0.0, y0 - (bottom - top) - 2 * line)
        tx = min(tx, max(0.0, canvas.width - (right - left) - 2 * line))
        draw.rectangle((tx, ty, tx + (right - left) + 2 * line, ty + (bottom - top) + 2 * line), fill=colour)
        text_colour = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        draw.text((tx + line, ty + line - top), label, fill=text_colour, font=font)
    return canvas
