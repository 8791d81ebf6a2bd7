"""Run by tests/test_deepspeed.py, once per rank: DeepSpeed's own ZeRO-2 engine trains the stage-2
trainable weights on the CPU over gloo (Lightning's DeepSpeedStrategy insists on CUDA), then saves a
checkpoint without the frozen weights, as ``RegionDeepSpeedStrategy`` does.

usage: RANK=r WORLD_SIZE=n MASTER_ADDR=.. MASTER_PORT=.. \
       python deepspeed_stage2_probe.py DATA_DIR LM_DIR STAGE1_CKPT OUT_DIR STEPS

Writes ``OUT_DIR/zero/`` (the DeepSpeed checkpoint folder, tag ``checkpoint`` as Lightning names it),
and per rank ``OUT_DIR/rank{r}.json`` (losses, image ids) and ``OUT_DIR/rank{r}.pt`` (its trainable weights).
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import lightning
import torch

from fineregion_pl.data import RegionDataModule
from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings
from fineregion_pl.train.stage2 import Stage2Module


def main() -> None:
    data_dir, lm_dir, stage1, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    steps = int(sys.argv[5])
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    module = Stage2Module(
        language_model=LanguageModelConfig(name_or_path=lm_dir, lora=lora), init_from=stage1,
        prompt_tokens=2, prompt_hidden=32, consistency_weight=0.01, warmup_steps=0,
    )
    module.configure_model()
    module.forward = lambda batch: module.losses(batch)["loss"]  # the engine calls the module
    trainable = [p for p in module.parameters() if p.requires_grad]

    data = RegionDataModule([data_dir], image_size=64, batch_size=4, num_workers=0, max_regions=4)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    batch = next(batches)
    for _ in range(rank):  # each rank learns from its own images
        batch = next(batches)

    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=trainable, config=config)
    losses = []
    for _ in range(steps):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))

    # what Lightning hands DeepSpeed as client state: its own keys, plus what on_save_checkpoint adds
    client = {"state_dict": {}, "hyper_parameters": dict(module.hparams), "hparams_name": "kwargs", "epoch": 0,
              "global_step": steps, "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(client)
    del client["state_dict"]
    engine.save_checkpoint(str(out / "zero"), tag="checkpoint", client_state=client, exclude_frozen_parameters=True)

    trained = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    torch.save(trained, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "image_ids": list(batch["image_ids"])}))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
