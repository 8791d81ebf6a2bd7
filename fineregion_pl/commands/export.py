"""``fineregion-pl export``: a trained stage-2 checkpoint as plain Hugging Face / peft folders.

Layout of ``OUT`` (:meth:`RegionCaptioner.save_pretrained`, the model library's native format)::

    adapter/              the LoRA adapter (peft ``save_pretrained``; ``PeftModel.from_pretrained(base, OUT/adapter)``)
    merged/               base LM with the adapter merged in, and its tokenizer
                          (``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM.from_pretrained(OUT/merged)``)
    vision.safetensors    the vision side: encoder, category head, attention (``vision.*``) and region prompt (``prompt.*``)
    fineregion.json       the captioner's config (encoder, prompt, templates, decoding), to rebuild it

With full fine-tuning (no LoRA) there is no ``adapter/``; ``merged/`` is the fine-tuned LM.
``RegionCaptioner.from_pretrained(OUT)`` (or ``from_export``) loads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

from fineregion_pl.model.captioner import EXPORT_CONFIG, VISION_WEIGHTS, RegionCaptioner

__all__ = ["EXPORT_CONFIG", "VISION_WEIGHTS", "export"]


def export(*, ckpt_path: str, out: str, merge: bool = True, dtype: str = "float32") -> Path:
    """Export a stage-2 checkpoint: LoRA adapter, merged LM and the vision side.

    The base LM is loaded in float32 and the adapter merged in float32, so the export computes
    what the checkpoint computes; ``fineregion.json`` records the measured largest logit
    difference between the two (``max_logit_difference``).

    Args:
        ckpt_path: a stage-2 Lightning checkpoint (``.../last.ckpt``).
        out: output folder (created; existing files are overwritten).
        merge: also write the merged model (``merged/``).
        dtype: what ``merged/`` is saved in: ``float32`` (exact), ``bfloat16`` or ``float16``
            (half the size; the recorded difference says what it costs).
    """
    captioner = RegionCaptioner.from_checkpoint(ckpt_path, dtype="float32")
    out_dir = captioner.save_pretrained(out, merge=merge, dtype=dtype, exported_from=str(ckpt_path))
    kind = "adapter + merged" if (out_dir / "adapter").is_dir() and merge else ("adapter" if (out_dir / "adapter").is_dir() else "full model")
    difference = json.loads((out_dir / EXPORT_CONFIG).read_text()).get("max_logit_difference")
    measured = "" if difference is None else f"; max logit difference to the checkpoint {difference:.2e}"
    print(f"exported {ckpt_path} to {out_dir} ({kind}, {dtype}{measured})")
    return out_dir
