"""Shared machinery of the real-data converters (``data_prep/refcocog.py``, ``data_prep/visual_genome.py``).

A converter reads its dataset's annotation files and turns them into *image jobs*, plain
picklable dicts, one per image and split::

    {"key": "581857", "image_id": 581857, "split": "train", "source_file": "refs(umd).p",
     "files": [[absolute path, file name for the record], ...],   # candidates, first existing wins
     "width": 427, "height": 640,                                  # annotated size, or None
     "extra": {...},                                               # more image-level record fields
     "regions": [{"label": "ref 0 ann 1719310",                    # names the record in messages
                  "bbox_xywh": [x, y, w, h],                       # as the dataset gives it
                  "fields": {"id": ..., "category": ..., "category_id": ..., "captions": [...],
                             "captions_raw": [...], "referring": [...], "segmentation": ...}}],
     "questions": [{"regions": [id_a, id_b], "question": str, "answer": str}]}

:func:`write_shard_sets` validates and writes them: the image must exist, decode and have the
annotated size; each box is checked and converted from ``xywh`` to absolute ``xyxy`` here, once;
images are optionally shrunk (boxes and segmentations scaled with them). Images of a split are
sorted by id and cut into fixed chunks of ``max_count`` images; each chunk is written on its own
(in parallel with ``workers > 1``) to ``<split>-<chunk>-<part>.tar`` shards and leaves a record
``chunks/<chunk>.json``, so a re-run keeps every chunk whose record and shards exist and redoes the
others, with byte-identical results. The manifest is rebuilt from the chunk records.

Every source region ends in exactly one written sample or in the ``skipped`` counts of its
split's manifest (reasons below); images, sentences and questions that are dropped are counted
in ``skipped_images``, ``skipped_sentences`` and ``skipped_questions``. With ``strict`` the first
bad record raises :class:`BadRecord` instead, naming the record.

Skip reasons: ``missing_image``, ``unreadable_image``, ``image_size_mismatch`` (the image's
regions and the image), ``box_malformed``, ``box_not_finite``, ``box_empty`` (w or h <= 0),
``box_outside_image`` (beyond the tolerance; boxes within it are clamped), ``empty_text``,
``missing_annotation`` (RefCOCO), ``no_valid_regions`` (images), ``region_skipped``,
``no_matching_region``, ``same_region``, ``duplicate`` (questions).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from fineregion_pl.data.shards import MANIFEST, encode_sample, shard_writer, write_json_atomic
from fineregion_pl.model.boxes import four_numbers
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.images import as_rgb, has_orientation
from fineregion_pl.model.transforms import scale_segmentation

FORMAT_VERSION = 1
CHUNKS_DIR = "chunks"
SKIP_KEYS = {"regions": "skipped", "images": "skipped_images", "sentences": "skipped_sentences", "questions": "skipped_questions"}
SPLIT_ORDER = ["train", "val", "test", "testA", "testB", "testC"]


class BadRecord(BadInputError):
    """A record the converter cannot use (raised in ``--strict`` mode; counted otherwise)."""


InputError = BadInputError  # the converters' name for a fatal input problem (the same class)


@dataclass(frozen=True)
class ConvertSettings:
    """Options shared by the converters (see :func:`add_common_arguments` for their meaning)."""

    out: str
    max_count: int = 1000
    max_size: float = 1e9
    max_side: Optional[int] = None
    jpeg_quality: int = 90
    box_tolerance: float = 4.0
    workers: int = 1
    strict: bool = False
    progress: bool = True

    def output_settings(self) -> dict:
        """The settings that change the shards' bytes (recorded in manifests and chunk digests)."""
        return {"max_count": self.max_count, "max_size": self.max_size, "max_side": self.max_side,
                "jpeg_quality": self.jpeg_quality, "box_tolerance": self.box_tolerance}


class SkipLog:
    """Counts of skipped records by split, unit (regions/images/sentences/questions) and reason.

    In strict mode the first skip of a bad record raises :class:`BadRecord` with its message
    instead; skips that are not the data's fault (``bad=False``, e.g. a relationship no region
    matches) are counted in either mode.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: dict[tuple[str, str], Counter] = defaultdict(Counter)

    def add(self, split: str, unit: str, reason: str, message: str, count: int = 1, bad: bool = True) -> None:
        """Count ``count`` skipped ``unit`` of ``split`` for ``reason`` (or raise ``message`` when strict and ``bad``)."""
        if unit not in SKIP_KEYS:
            raise KeyError(unit)
        if count == 0:
            return
        if self.strict and bad:
            raise BadRecord(message)
        self.counts[(split, unit)][reason] += count

    def merge(self, split: str, counts: dict[str, dict[str, int]]) -> None:
        """Add the counts of a chunk record (``{manifest key: {reason: n}}``) to ``split``."""
        for unit, key in SKIP_KEYS.items():
            self.counts[(split, unit)].update(counts.get(key, {}))

    def for_split(self, split: str) -> dict[str, dict[str, int]]:
        """``{"skipped": {...}, "skipped_images": {...}, ...}`` of one split, reasons sorted."""
        return {key: dict(sorted(self.counts[(split, unit)].items())) for unit, key in SKIP_KEYS.items()}


# ---------------------------------------------------------------------------------------------
# Text, boxes, splits


def clean_text(text: Any) -> str:
    """Strip and collapse whitespace; ``None`` gives ``""``."""
    return " ".join(str(text).split()) if text is not None else ""


def _coord(value: float) -> float:
    """A stored coordinate: rounded to 1/1000 pixel (drops float noise such as ``238.15000000000003``)."""
    return round(float(value), 3) + 0.0


def xywh_to_xyxy(box: Iterable[float]) -> list[float]:
    """``[x, y, w, h]`` to ``[x0, y0, x1, y1]`` (floats, rounded to 1/1000 pixel)."""
    x, y, w, h = (float(v) for v in box)
    return [_coord(x), _coord(y), _coord(x + w), _coord(y + h)]


def check_box(xywh: Any, width: float, height: float, tolerance: float) -> tuple[Optional[list[float]], Optional[str], str]:
    """Validate a dataset ``xywh`` box against a ``width x height`` image and convert it to ``xyxy``.

    Returns ``(xyxy, None, "")`` for a usable box (clamped to the image when it sticks out by at
    most ``tolerance`` pixels), else ``(None, reason, problem)`` where ``problem`` completes a
    sentence such as ``"image 1 region 4091 " + problem``.
    """
    values, problem = four_numbers(xywh)
    if problem == "has a non-finite value":
        return None, "box_not_finite", f"has a non-finite box {xywh!r}"
    if problem:
        return None, "box_malformed", f"has a malformed box {xywh!r} (want [x, y, w, h])"
    x, y, w, h = values
    if w <= 0 or h <= 0:
        side, value = ("width", w) if w <= 0 else ("height", h)
        return None, "box_empty", f"has {side} {value:g}"
    x0, y0, x1, y1 = xywh_to_xyxy((x, y, w, h))
    overshoot = max(-x0, -y0, x1 - width, y1 - height)
    clamped = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
    if overshoot > tolerance or clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return None, "box_outside_image", (f"box {[x0, y0, x1, y1]} lies outside the {width:g}x{height:g} image by "
                                           f"{overshoot:g} px (tolerance {tolerance:g}, see --box-tolerance)")
    return clamped, None, ""


def best_matches(queries: np.ndarray, targets: np.ndarray, min_iou: float) -> list[Optional[int]]:
    """For each ``xywh`` query box the index of the target with the highest IoU (torchvision's
    ``box_iou``), if it is at least ``min_iou``."""
    if len(queries) == 0 or len(targets) == 0:
        return [None] * len(queries)
    import torch
    from torchvision.ops import box_convert, box_iou

    def xyxy(boxes: np.ndarray) -> torch.Tensor:
        return box_convert(torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)), "xywh", "xyxy")

    iou = torch.nan_to_num(box_iou(xyxy(queries), xyxy(targets)), nan=0.0).numpy()
    best = iou.argmax(axis=1)
    return [int(j) if iou[i, j] >= min_iou else None for i, j in enumerate(best)]


def hash_split(image_id: Any, ratios: dict[str, float]) -> str:
    """The split of an image from a hash of its id: stable across runs, machines and dataset versions."""
    total = sum(ratios.values())
    u = int.from_bytes(hashlib.sha256(str(image_id).encode("utf-8")).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for name, ratio in ratios.items():
        edge += ratio / total
        if u < edge:
            return name
    return [name for name, ratio in ratios.items() if ratio > 0][-1]


def ordered_splits(names: Iterable[str]) -> list[str]:
    """Split names in the usual order (train, val, test, testA, testB, ...), others after, alphabetically."""
    return sorted(set(names), key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


def id_sort_key(image_id: Any) -> tuple:
    """Sort integer ids numerically, before any other ids sorted as strings."""
    return (0, int(image_id), "") if isinstance(image_id, int) or str(image_id).isdigit() else (1, 0, str(image_id))


# ---------------------------------------------------------------------------------------------
# Images and segmentations


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes completely (so truncated files fail here); raises ``ValueError`` when unreadable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__
        raise ValueError(reason) from error


def stored_image(image: Image.Image, data: bytes, max_side: Optional[int], quality: int) -> tuple[bytes, int, int]:
    """The JPEG bytes to store and their size: the original bytes when they are an RGB or grey JPEG
    without an EXIF orientation tag that fits ``max_side``.

    Otherwise the image is resized so its longer side is ``max_side`` (bicubic) and re-encoded as
    an RGB JPEG of ``quality``; the same input gives the same bytes.
    """
    w, h = image.size
    scale = max_side / max(w, h) if max_side and max(w, h) > max_side else 1.0
    if scale == 1.0 and image.format == "JPEG" and image.mode in ("RGB", "L") and not has_orientation(image):
        return data, w, h
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = as_rgb(image, orientation=False)  # 16-bit, palette, alpha, CMYK as every reader does; no EXIF tag kept
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), size[0], size[1]


# ---------------------------------------------------------------------------------------------
# One image


def _skip_image(log: SkipLog, job: dict, reason: str, message: str) -> None:
    """Count an image, all its regions and questions as skipped for ``reason``; returns ``None``."""
    log.add(job["split"], "images", reason, message)
    log.add(job["split"], "regions", reason, message, len(job["regions"]))
    log.add(job["split"], "questions", "region_skipped", message, len(job["questions"]))
    return None


def _find_file(job: dict) -> Optional[tuple[str, str]]:
    """The first existing candidate ``(path, file name)`` of an image job."""
    return next(((path, name) for path, name in job["files"] if os.path.isfile(path)), None)


def _checked_regions(job: dict, width: int, height: int, tolerance: float, log: SkipLog) -> list[dict]:
    """The job's usable regions as ``{"id", "box" (xyxy), **fields}``; the others are counted."""
    kept = []
    for region in job["regions"]:
        where = f"{job['source_file']}: image {job['image_id']} {region['label']}"
        box, reason, problem = check_box(region["bbox_xywh"], width, height, tolerance)
        if box is None:
            log.add(job["split"], "regions", reason, f"{where} {problem}")
        elif not region["fields"].get("captions"):
            log.add(job["split"], "regions", "empty_text", f"{where} has no text")
        else:
            kept.append({"id": region["fields"]["id"], "box": box, **{k: v for k, v in region["fields"].items() if k != "id"}})
    return kept


def _kept_questions(job: dict, region_ids: set, log: SkipLog) -> list[dict]:
    """The job's questions whose regions were both kept; the others are counted."""
    kept = [q for q in job["questions"] if all(r in region_ids for r in q["regions"])]
    log.add(job["split"], "questions", "region_skipped",
            f"{job['source_file']}: image {job['image_id']} has a question about a skipped region", len(job["questions"]) - len(kept))
    return kept


def _scaled(region: dict, sx: float, sy: float, width: int, height: int) -> dict:
    """A region with its box and segmentation scaled to the stored image."""
    if sx == 1.0 and sy == 1.0:
        return region
    x0, y0, x1, y1 = region["box"]
    box = [_coord(x0 * sx), _coord(y0 * sy), min(_coord(x1 * sx), float(width)), min(_coord(y1 * sy), float(height))]
    return {**region, "box": box, "segmentation": scale_segmentation(region.get("segmentation"), sx, sy, width, height)}


def convert_image(job: dict, source: str, settings: ConvertSettings, log: SkipLog) -> Optional[dict]:
    """Validate one image job of dataset ``source`` and return its webdataset sample, or ``None`` when it is skipped (counted in ``log``)."""
    where = f"{job['source_file']}: image {job['image_id']}"
    found = _find_file(job)
    if found is None:
        looked = ", ".join(path for path, _ in job["files"])
        return _skip_image(log, job, "missing_image", f"{where}: no image file (looked for {looked})")
    path, file_name = found
    data = Path(path).read_bytes()
    try:
        image = decode_image(data)
    except ValueError as error:
        return _skip_image(log, job, "unreadable_image", f"{path}: image {job['image_id']} cannot be decoded ({error})")
    width, height = image.size
    if job.get("width") is not None and (int(job["width"]), int(job["height"])) != (width, height):
        return _skip_image(log, job, "image_size_mismatch",
                           f"{path}: image {job['image_id']} is {width}x{height} but {job['source_file']} says {job['width']}x{job['height']}")
    regions = _checked_regions(job, width, height, settings.box_tolerance, log)
    if not regions:
        log.add(job["split"], "images", "no_valid_regions", f"{where} has no usable region")
        log.add(job["split"], "questions", "region_skipped", f"{where} has no usable region", len(job["questions"]))
        return None
    questions = _kept_questions(job, {r["id"] for r in regions}, log)
    image_bytes, out_w, out_h = stored_image(image, data, settings.max_side, settings.jpeg_quality)
    sx, sy = out_w / width, out_h / height
    record = {
        "image_id": job["image_id"], "source": source, "split": job["split"], "file_name": file_name,
        "width": out_w, "height": out_h, **job.get("extra", {}),
        "regions": [_scaled(r, sx, sy, out_w, out_h) for r in regions],
        "questions": questions,
    }
    return encode_sample(job["key"], image_bytes, record)


# ---------------------------------------------------------------------------------------------
# Chunks of a split


def _chunk_shard_re(split: str, chunk: Optional[int] = None) -> re.Pattern:
    """File names of the shards (and their temporary files) of one chunk, or of every chunk of a split."""
    number = f"{chunk:06d}" if chunk is not None else r"(\d{6})"
    return re.compile(rf"^{re.escape(split)}-{number}-\d{{3}}\.tar(\.tmp)?$")


def _remove_matching(folder: Path, pattern: re.Pattern) -> None:
    """Delete the files of ``folder`` whose names match ``pattern``."""
    for path in [p for p in folder.iterdir() if pattern.match(p.name)]:
        path.unlink()


def chunk_record_path(split_dir: Path, chunk: int) -> Path:
    """Where the record of a finished chunk lives."""
    return Path(split_dir) / CHUNKS_DIR / f"{chunk:06d}.json"


def convert_chunk(task: dict) -> dict:
    """Write one chunk's shards (``<split>-<chunk>-NNN.tar``) and its record; returns the record.

    ``task`` holds ``source``, ``split_dir``, ``split``, ``chunk``, ``digest``, ``settings`` (a
    :class:`ConvertSettings` as a dict) and the chunk's ``jobs``. Old files of the chunk are
    removed first, so an interrupted chunk is redone from scratch.
    """
    settings = ConvertSettings(**task["settings"])
    split_dir, split, chunk = Path(task["split_dir"]), task["split"], task["chunk"]
    _remove_matching(split_dir, _chunk_shard_re(split, chunk))
    chunk_record_path(split_dir, chunk).unlink(missing_ok=True)
    log, writer = SkipLog(settings.strict), None
    totals = Counter()
    try:
        for job in task["jobs"]:
            sample = convert_image(job, task["source"], settings, log)
            if sample is None:
                continue
            if writer is None:
                writer = shard_writer(str(split_dir / f"{split}-{chunk:06d}-%03d.tar"), maxcount=settings.max_count, maxsize=settings.max_size)
            writer.write(sample)
            record = json.loads(sample["json"])
            totals.update(images=1, regions=len(record["regions"]), questions=len(record["questions"]),
                          sentences=sum(len(r["captions"]) for r in record["regions"]))
    except BaseException:
        if writer is not None:
            writer.close()
        _remove_matching(split_dir, _chunk_shard_re(split, chunk))
        raise
    if writer is not None:
        writer.close()
    pattern = _chunk_shard_re(split, chunk)
    result = {
        "split": split, "chunk": chunk, "digest": task["digest"], "num_jobs": len(task["jobs"]),
        "shards": sorted(p.name for p in split_dir.iterdir() if pattern.match(p.name) and p.suffix == ".tar"),
        **{f"num_{k}": totals[k] for k in ("images", "regions", "sentences", "questions")},
        **log.for_split(split),
    }
    write_json_atomic(chunk_record_path(split_dir, chunk), result)
    return result


def _digest(source: str, split: str, chunk: int, settings: ConvertSettings, jobs: list[dict]) -> str:
    """A fingerprint of everything that decides a chunk's bytes."""
    payload = [FORMAT_VERSION, source, split, chunk, settings.output_settings(), jobs]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _finished_record(split_dir: Path, chunk: int, digest: str) -> Optional[dict]:
    """The record of a chunk that is finished with the same inputs and settings, else ``None``."""
    path = chunk_record_path(split_dir, chunk)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    done = record.get("digest") == digest and all((split_dir / name).is_file() for name in record.get("shards", []))
    return record if done else None


def plan_chunks(source: str, split: str, jobs: list[dict], settings: ConvertSettings) -> list[dict]:
    """Cut a split's jobs (sorted by image id) into chunk tasks of ``max_count`` images."""
    split_dir = Path(settings.out) / split
    jobs = sorted(jobs, key=lambda j: id_sort_key(j["image_id"]))
    size = max(1, settings.max_count)
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    return [{"source": source, "split_dir": str(split_dir), "split": split, "chunk": c, "jobs": chunk, "settings": asdict(settings),
             "digest": _digest(source, split, c, settings, chunk)} for c, chunk in enumerate(chunks)]


def _remove_stale(split_dir: Path, split: str, num_chunks: int) -> None:
    """Delete shards, temporary files and records of chunks beyond ``num_chunks`` (left by an earlier run)."""
    pattern = _chunk_shard_re(split)
    for path in [p for p in split_dir.iterdir() if pattern.match(p.name) and int(pattern.match(p.name).group(1)) >= num_chunks]:
        path.unlink()
    for path in [p for p in (split_dir / CHUNKS_DIR).glob("*.json") if p.stem.isdigit() and int(p.stem) >= num_chunks]:
        path.unlink()


def _run_tasks(tasks: list[dict], settings: ConvertSettings, desc: str) -> list[dict]:
    """Run chunk tasks, in ``settings.workers`` processes when more than one, with a progress bar over images."""
    results = []
    with tqdm(total=sum(len(t["jobs"]) for t in tasks), desc=desc, unit="img", disable=not settings.progress or not tasks, file=sys.stderr) as bar:
        if settings.workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results.append(convert_chunk(task))
                bar.update(len(task["jobs"]))
            return results
        with ProcessPoolExecutor(max_workers=settings.workers) as pool:
            pending = {pool.submit(convert_chunk, task): task for task in tasks}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    task = pending.pop(future)
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    results.append(future.result())
                    bar.update(len(task["jobs"]))
    return results


def write_shard_sets(source: str, jobs_by_split: dict[str, list[dict]], settings: ConvertSettings, log: SkipLog,
                     categories: list[str], extra: Optional[dict] = None) -> dict[str, dict]:
    """Write every split's shards and manifest; returns the manifests by split.

    Args:
        source: dataset name recorded in every sample and manifest.
        jobs_by_split: image jobs (see the module docstring) by split name; a split with no job
            gets an empty manifest.
        settings: output options.
        log: skips counted while reading the annotations (merged into the manifests); in strict
            mode it raises on the first bad record.
        categories: category names, index = ``category_id``.
        extra: more manifest fields (e.g. ``split_ratios``, ``source_files``).
    """
    splits = ordered_splits(jobs_by_split)
    for split in splits:
        (Path(settings.out) / split / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    tasks = [t for split in splits for t in plan_chunks(source, split, jobs_by_split[split], settings)]
    reused = {(t["split"], t["chunk"]): _finished_record(Path(t["split_dir"]), t["chunk"], t["digest"]) for t in tasks}
    todo = [t for t in tasks if reused[(t["split"], t["chunk"])] is None]
    fresh = {(r["split"], r["chunk"]): r for r in _run_tasks(todo, settings, source)}
    records = {**{k: v for k, v in reused.items() if v is not None}, **fresh}
    return {split: _write_manifest(source, split, [t for t in tasks if t["split"] == split], records, settings, log, categories, extra or {}) for split in splits}


def _write_manifest(source: str, split: str, tasks: list[dict], records: dict, settings: ConvertSettings, log: SkipLog,
                    categories: list[str], extra: dict) -> dict:
    """Sum a split's chunk records into its manifest, write it, and delete leftovers of earlier runs."""
    split_dir = Path(settings.out) / split
    chunk_records = [records[(split, t["chunk"])] for t in tasks]
    _remove_stale(split_dir, split, len(tasks))
    counts = SkipLog()
    for part in [log.for_split(split), *chunk_records]:
        counts.merge(split, part)
    manifest = {
        "split": split, "source": source,
        **{f"num_{k}": sum(r[f"num_{k}"] for r in chunk_records) for k in ("images", "regions", "sentences", "questions")},
        "categories": list(categories),
        "shards": sorted(name for r in chunk_records for name in r["shards"]),
        **counts.for_split(split),
        "chunks": len(chunk_records),
        "settings": settings.output_settings(),
        **extra,
    }
    write_json_atomic(split_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The output, sharding, image, validation and parallelism flags both converters share."""
    parser.add_argument("--out", required=True, help="output folder; each split goes to OUT/<split>/ (shards, manifest.json, chunks/)")
    parser.add_argument("--max-count", type=int, default=1000,
                        help="images per shard and per chunk (the unit of parallel work and of resuming) (default: %(default)s)")
    parser.add_argument("--max-size", type=float, default=1e9, help="bytes per shard before a chunk starts a new shard (default: %(default)g)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="re-encode images whose longer side exceeds PX to that side (boxes and segmentations scaled with them); "
                             "default: store the original JPEG bytes")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality when re-encoding (default: %(default)s)")
    parser.add_argument("--box-tolerance", type=float, default=4.0,
                        help="pixels a box may stick out of its image and still be kept (clamped); beyond, it is skipped (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes, one chunk each at a time (default: %(default)s)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record with a one-line error and exit code 2 instead of skipping and counting it")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def settings_from_args(args: argparse.Namespace) -> ConvertSettings:
    """:class:`ConvertSettings` from parsed common flags, checking their ranges."""
    if args.max_count < 1 or args.max_size <= 0 or args.workers < 1 or args.box_tolerance < 0 or not 1 <= args.jpeg_quality <= 100:
        raise InputError("--max-count, --max-size and --workers must be positive, --box-tolerance >= 0, --jpeg-quality in 1..100")
    if args.max_side is not None and args.max_side < 1:
        raise InputError(f"--max-side must be a positive number of pixels, not {args.max_side}")
    return ConvertSettings(out=str(args.out), max_count=args.max_count, max_size=args.max_size, max_side=args.max_side,
                           jpeg_quality=args.jpeg_quality, box_tolerance=args.box_tolerance, workers=args.workers,
                           strict=args.strict, progress=not args.no_progress)


def _reasons(counts: dict[str, int]) -> str:
    """``"3 (box_empty 1, empty_text 2)"``."""
    total = sum(counts.values())
    return f"{total} ({', '.join(f'{k} {v}' for k, v in counts.items())})" if total else "0"


def summary_line(source: str, out: str, manifests: dict[str, dict], unassigned: Optional[dict] = None) -> str:
    """One line: what was written per split and what was skipped, by reason."""
    def total(key: str) -> dict[str, int]:
        summed = Counter()
        for m in manifests.values():
            summed.update(m[key])
        return dict(sorted(summed.items()))

    written = ", ".join(f"{s} {m['num_images']} images/{m['num_regions']} regions" for s, m in manifests.items())
    skipped = "; ".join(f"{unit} {_reasons(total(key))}" for unit, key in SKIP_KEYS.items())
    line = f"{source} -> {out}: {written}; skipped {skipped}"
    if unassigned:
        line += f"; not in any split: {unassigned.get('images', 0)} images/{unassigned.get('regions', 0)} regions"
    return line


def run_cli(convert: Callable[[argparse.Namespace], tuple[str, dict[str, dict], Optional[dict]]], args: argparse.Namespace) -> int:
    """Run a converter's ``convert(args) -> (source, manifests, unassigned)``, print the summary, return the exit code.

    A bad record in strict mode or an unusable input prints one ``error: ...`` line and returns 2.
    """
    try:
        source, manifests, unassigned = convert(args)
    except (BadRecord, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_line(source, args.out, manifests, unassigned))
    return 0
