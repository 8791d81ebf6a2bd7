"""``fineregion-pl export``: a trained stage-2 checkpoint as plain Hugging Face / peft folders.

Layout of ``OUT``::

    adapter/              the LoRA adapter (peft ``save_pretrained``; ``PeftModel.from_pretrained(base, OUT/adapter)``)
    merged/               base LM with the adapter merged in, and its tokenizer
                          (``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM.from_pretrained(OUT/merged)``)
    vision.safetensors    the vision side: encoder, category head, attention (``vision.*``) and region prompt (``prompt.*``)
    fineregion.json       what is needed to rebuild the vision side and the prompt, and the templates

With full fine-tuning (no LoRA) there is no ``adapter/``; ``merged/`` is the fine-tuned LM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXPORT_CONFIG = "fineregion.json"
VISION_WEIGHTS = "vision.safetensors"


def export_config(module: Any) -> dict:
    """The hyper-parameters an export needs, as plain JSON."""
    keys = ("encoder", "num_classes", "categories", "head_hidden", "attn_dim", "prompt_mode", "prompt_tokens", "prompt_hidden", "masking", "max_new_tokens", "num_beams")
    config = {k: module.hparams[k] for k in keys}
    config["language_model"] = dict(module.hparams.language_model)
    config["encoder_decoder"] = module.language.encoder_decoder
    return config


def export(*, ckpt_path: str, out: str, merge: bool = True) -> Path:
    """Export a stage-2 checkpoint: LoRA adapter, merged LM and the vision side.

    Args:
        ckpt_path: a stage-2 Lightning checkpoint (``.../last.ckpt``).
        out: output folder (created; existing files are overwritten).
        merge: also write the merged model (``merged/``).
    """
    import transformers
    from peft import PeftModel
    from safetensors.torch import save_file

    from .stage2 import Stage2Module

    # init_from=None: the stage-2 checkpoint holds the vision weights, the stage-1 file is not needed
    module = Stage2Module.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, init_from=None).eval()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    language = module.language
    lora = isinstance(language.model, PeftModel)
    base_name = module.hparams.language_model["name_or_path"]
    merged_dir = out_dir / "merged"
    if lora:
        language.model.save_pretrained(out_dir / "adapter")
        language.tokenizer.save_pretrained(out_dir / "adapter")
        if merge:
            auto = transformers.AutoModelForSeq2SeqLM if language.encoder_decoder else transformers.AutoModelForCausalLM
            base = auto.from_pretrained(base_name, dtype=language.model.get_input_embeddings().weight.dtype)
            merged = PeftModel.from_pretrained(base, out_dir / "adapter").merge_and_unload()
            merged.save_pretrained(merged_dir)
    else:
        language.model.save_pretrained(merged_dir)
    if merge or not lora:
        language.tokenizer.save_pretrained(merged_dir)
    weights = {f"vision.{k}": v.contiguous() for k, v in module.vision.state_dict().items()}
    weights.update({f"prompt.{k}": v.contiguous() for k, v in module.prompt.state_dict().items()})
    save_file(weights, str(out_dir / VISION_WEIGHTS))
    config = export_config(module)
    config["exported_from"] = str(ckpt_path)
    config["base_model"] = base_name
    config["lora"] = lora
    (out_dir / EXPORT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    print(f"exported {ckpt_path} to {out_dir} ({'adapter + merged' if lora else 'full model'})")
    return out_dir


def load_vision_weights(module: Any, export_dir: Path) -> None:
    """Load ``vision.safetensors`` of an export into a module with ``vision`` and ``prompt`` parts."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(export_dir) / VISION_WEIGHTS))
    module.vision.load_state_dict({k[len("vision."):]: v for k, v in weights.items() if k.startswith("vision.")})
    module.prompt.load_state_dict({k[len("prompt."):]: v for k, v in weights.items() if k.startswith("prompt.")})

