"""Run by tests/test_deepspeed.py in its own process (one gloo rank): does stage 2 build its LM sharded
under ``RegionDeepSpeedStrategy(stage=3)``, the way Lightning calls ``configure_model`` inside the
strategy's ``model_sharded_context``?

usage: RANK=0 WORLD_SIZE=1 MASTER_ADDR=.. MASTER_PORT=.. python zero3_build_probe.py LM_DIR STAGE1_CKPT OUT_JSON

Writes OUT_JSON: how many LM weights are ZeRO-3 partitions, whether the gathered embedding equals the
pretrained one, the largest LoRA-B entry (peft starts it at zero), the prompt's width and scale.
On an exception the traceback's last line is written as ``error``.
"""

import json
import os
import sys
import traceback

import deepspeed
import torch
from safetensors.torch import load_file

from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings
from fineregion_pl.train.stage2 import Stage2Module
from fineregion_pl.train.strategies import RegionDeepSpeedStrategy


def gathered(param: torch.nn.Parameter) -> torch.Tensor:
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def main() -> None:
    lm_dir, stage1, out = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    strategy = RegionDeepSpeedStrategy(stage=3)
    strategy.config["train_micro_batch_size_per_gpu"] = 1  # what Lightning's trainer fills in
    strategy._config_initialized = True
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    module = Stage2Module(language_model=LanguageModelConfig(name_or_path=lm_dir, lora=lora), init_from=stage1, prompt_tokens=2, prompt_hidden=32)
    result = {}
    try:
        with strategy.model_sharded_context():
            module.configure_model()
        lm_params = dict(module.model.language.named_parameters())
        embedding = module.model.language.model.get_input_embeddings().weight
        pretrained = load_file(os.path.join(lm_dir, "model.safetensors"))
        (key,) = [k for k in pretrained if k.endswith("embed_tokens.weight")]
        lora_b = [p for n, p in lm_params.items() if ".lora_B." in n]
        result = {
            "lm_params": len(lm_params),
            "partitioned": sum(hasattr(p, "ds_id") for p in lm_params.values()),
            "embedding_matches": bool(torch.equal(gathered(embedding).float(), pretrained[key].float())),
            "lora_b_max": max(float(gathered(p).abs().max()) for p in lora_b),
            "prompt_width": int(module.model.prompt.lm_dim),
            "hidden_size": int(pretrained[key].shape[1]),
            "prompt_scale": float(module.model.prompt.embed_scale),
            "embedding_rms": float(pretrained[key].float().pow(2).mean().sqrt()),
        }
    except Exception:
        result["error"] = traceback.format_exc().strip().splitlines()[-1]
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
