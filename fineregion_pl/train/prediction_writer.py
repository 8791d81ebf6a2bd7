"""Writes ``fineregion-pl predict`` output: JSONL (one line per region) and, optionally, pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from fineregion_pl.data.drawing import draw_regions, model_input_to_image, picture_name
from fineregion_pl.data.shards import write_json_atomic


class RegionPredictionWriter(BasePredictionWriter):
    """Writes every predicted region as a JSON line, and draws regions and captions on the images.

    Files: ``OUTPUT_DIR/predictions.jsonl`` (``predictions.rankN.jsonl`` on rank N > 0 of a
    multi-process run), ``predictions.summary.json`` (``.rankN``: regions, images, pictures and
    the images skipped by reason, so nothing is dropped without a count) and, with ``draw``,
    ``OUTPUT_DIR/images/<image>.png`` (names never collide: :func:`~fineregion_pl.data.drawing.picture_name`).

    Args:
        output_dir: output folder (default: the run's log folder + ``/predictions``).
        draw: also write a PNG per image with its boxes and captions.
        max_drawings: draw at most this many images (per process).
    """

    def __init__(self, output_dir: Optional[str] = None, draw: bool = False, max_drawings: int = 1000):
        super().__init__(write_interval="batch")
        self.output_dir, self.draw, self.max_drawings = output_dir, draw, max_drawings
        self._file = None
        self._drawn = 0
        self._regions = 0
        self._images = 0
        self._names: set[str] = set()

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.jsonl" if trainer.global_rank == 0 else f"predictions.rank{trainer.global_rank}.jsonl"
        self._file = open(folder / name, "w", encoding="utf-8")
        self._drawn = self._regions = self._images = 0
        self._names = set()

    def write_on_batch_end(self, trainer, pl_module, prediction: list[dict], batch_indices, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch is None or self._file is None:
            return
        for row in prediction:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._regions += len(prediction)
        self._images += len(batch["image_ids"])
        if self.draw:
            self._draw_batch(trainer, batch, prediction)

    def _draw_batch(self, trainer: L.Trainer, batch: dict, prediction: list[dict]) -> None:
        folder = self._folder(trainer) / "images"
        folder.mkdir(exist_ok=True)
        for b, image_id in enumerate(batch["image_ids"]):
            if self._drawn >= self.max_drawings:
                return
            rows = [r for r in prediction if r["image_id"] == image_id]
            image = model_input_to_image(batch["images"][b], float(batch["scales"][b]), batch["sizes"][b].tolist())
            name = picture_name(image_id, self._names)
            draw_regions(image, rows).save(folder / name)
            self._drawn += 1

    def _skipped(self, trainer: L.Trainer) -> dict[str, int]:
        """Images of the prediction data that gave no rows, by reason (image folders only: a shard
        split's skips are the warnings naming each sample and its manifest's counts)."""
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if not isinstance(getattr(dataset, "skipped", None), dict):
            return {}
        skipped = dict(dataset.skipped)
        sampler = getattr(loader, "sampler", None)
        assigned = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else len(dataset)
        if assigned > self._images:
            skipped["undecodable_image"] = assigned - self._images
        return skipped

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        skipped = self._skipped(trainer)
        suffix = "" if trainer.global_rank == 0 else f".rank{trainer.global_rank}"
        not_drawn = self._images - self._drawn if self.draw else 0  # over max_drawings
        summary = {"regions": self._regions, "images": self._images, "pictures": self._drawn, "not_drawn": not_drawn, "skipped_images": skipped}
        write_json_atomic(self._folder(trainer) / f"predictions.summary{suffix}.json", summary)
        skipped_text = f"; skipped {sum(skipped.values())} images ({', '.join(f'{k} {v}' for k, v in skipped.items())})" if skipped else ""
        rank_zero_info(f"wrote {self._regions} region predictions for {self._images} images to {self._folder(trainer)}"
                       + (f" and {self._drawn} pictures" if self.draw else "")
                       + (f" ({not_drawn} images not drawn: max_drawings={self.max_drawings})" if not_drawn else "") + skipped_text)
