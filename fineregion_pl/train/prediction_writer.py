"""Writes ``fineregion-pl predict`` output: JSONL (one line per region) and, optionally, pictures."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from fineregion_pl.data.drawing import draw_regions, model_input_to_image


class RegionPredictionWriter(BasePredictionWriter):
    """Writes every predicted region as a JSON line, and draws regions and captions on the images.

    Files: ``OUTPUT_DIR/predictions.jsonl`` (``predictions.rankN.jsonl`` on rank N > 0 of a
    multi-process run) and, with ``draw``, ``OUTPUT_DIR/images/<image>.png``.

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

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.jsonl" if trainer.global_rank == 0 else f"predictions.rank{trainer.global_rank}.jsonl"
        self._file = open(folder / name, "w", encoding="utf-8")
        self._drawn = self._regions = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: list[dict], batch_indices, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch is None or self._file is None:
            return
        for row in prediction:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._regions += len(prediction)
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
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id)).rsplit(".", 1)[0] + ".png"
            draw_regions(image, rows).save(folder / name)
            self._drawn += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        rank_zero_info(f"wrote {self._regions} region predictions to {self._folder(trainer)}" + (f" and {self._drawn} pictures" if self.draw else ""))
