"""Run by tests in a subprocess: a 2-process Lightning DDP run (CPU, gloo) that records which images
each rank sees in one training epoch and in one test pass.

usage: python ddp_data_probe.py DATA_DIR OUT_DIR NUM_WORKERS RESAMPLED
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from fineregion_pl.data.datamodule import RegionDataModule


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": [], "test": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(list(batch["image_ids"]))
        return (self.weight * batch["images"].mean()).sum()

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(list(batch["image_ids"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main():
    data_dir, out_dir, workers, resampled = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    data = RegionDataModule([data_dir], image_size=64, batch_size=8, num_workers=workers, resampled=resampled)
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(probe, data)
    trainer.test(probe, data, verbose=False)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(probe.seen))


if __name__ == "__main__":
    main()
