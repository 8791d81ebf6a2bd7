"""The results card: what produced a number, written at the top of every ``results.json`` and ``results.md``.

Protocol, annotation file (name and SHA-256), items scored and expected, tokenizers, prompt,
decoding, checkpoint, code version, world size, and whether the number is comparable with
published ones (and why not, when it is not).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Optional

from fineregion_pl import __version__
from fineregion_pl.data.annotations import file_sha256
from fineregion_pl.data.protocol_data import ProtocolRun
from fineregion_pl.evaluation.coco_caption import NO_JAVA_NOTE, PTB_TOKENIZER, PYTHON_TOKENIZER
from fineregion_pl.evaluation.rec import HIT_RULE


def code_version() -> dict[str, Any]:
    """This package's version and, in a git checkout, its commit and whether the tree has changes."""
    root = Path(__file__).resolve().parents[2]
    out: dict[str, Any] = {"fineregion_pl": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    out["libraries"] = library_versions()
    return out


# the libraries whose version can move the numbers: kernels (torch), model code (transformers, timm,
# peft), the synthetic images' rasteriser (pillow), the data stream (webdataset, numpy)
NUMERIC_LIBRARIES = ("torch", "transformers", "timm", "peft", "lightning", "pillow", "numpy", "webdataset")


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`NUMERIC_LIBRARIES` (``"absent"`` for one not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def model_fields(config: Any, checkpoint: Optional[str], world_size: int, ignore_regions: bool = False) -> dict[str, Any]:
    """The model side of a card: LM tokenizer, prompts, decoding, checkpoint (path and SHA-256), world size."""
    lm = config.language_model
    ckpt = None
    if checkpoint:
        path = Path(checkpoint)
        ckpt = {"path": str(path), "sha256": file_sha256(path) if path.is_file() else None}
    return {
        "lm_tokenizer": lm.name_or_path,
        "prompt": {"caption": lm.caption_template, "referring": lm.referring_template},
        "decoding": {"strategy": "greedy" if config.num_beams == 1 else "beam search", "num_beams": config.num_beams,
                     "do_sample": False, "max_new_tokens": config.max_new_tokens},
        "checkpoint": ckpt,
        "world_size": world_size,
        "no_region_control": ignore_regions,
    }


def protocol_card(run: ProtocolRun, scored: int, model: Optional[dict] = None, predictions: Optional[dict] = None) -> dict[str, Any]:
    """The card of a protocol result.

    Args:
        run: the protocol run (protocol, annotation file, options).
        scored: items that have a prediction.
        model: :func:`model_fields` (``test``); None when scoring a predictions file.
        predictions: ``{"files": [...], "sha256": [...]}`` of the scored file(s) (``evaluate``).
    """
    protocol, annotations = run.protocol, run.annotations
    expected = protocol.expected_items.get(annotations.path.name)
    in_file = len(annotations.items)
    caption_task = protocol.task in ("regcap", "densecap")
    reasons = [] if protocol.published else [f"{protocol.name}: no published number is measured this way"]
    if caption_task and run.score_without_java:
        reasons.append(NO_JAVA_NOTE)
    if scored < in_file:
        reasons.append(f"only {scored} of the file's {in_file} {protocol.unit} have a prediction")
    if expected and in_file != expected[0]:
        reasons.append(f"the file has {in_file} {protocol.unit}, the published set {expected[0]} ({expected[1]})")
    if model and model.get("no_region_control"):
        reasons.append("no-region control (every box replaced by the whole image)")
    card: dict[str, Any] = {
        "protocol": protocol.name,
        "summary": protocol.summary,
        "annotations": {"file": annotations.path.name, "path": str(annotations.path), "sha256": annotations.sha256, "format": annotations.format},
        "items": {"unit": protocol.unit, "scored": scored, "in_file": in_file, "expected": expected[0] if expected else None},
        "scorer": _scorer(run),
        "metric_tokenizer": (PYTHON_TOKENIZER if run.score_without_java else PTB_TOKENIZER) if caption_task else None,
        "comparable_with": protocol.comparable_with,
        "not_comparable_with": protocol.not_comparable_with,
        "comparable": not reasons,
        "not_comparable_because": reasons,
    }
    if run.proposals:
        card["proposals"] = run.proposals
    if predictions:
        card["predictions"] = predictions
    card.update(model or {"lm_tokenizer": None, "prompt": None, "decoding": None, "checkpoint": None, "world_size": None})
    card["code_version"] = code_version()
    return card


def _scorer(run: ProtocolRun) -> str:
    task = run.protocol.task
    if task in ("rec", "gt-ranking"):
        return f"acc@0.5 over every sentence of the file; hit: {HIT_RULE}"
    text = "pycocoevalcap COCOEvalCap steps (COCO.loadRes; only ids with a result are scored; BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr; SPICE off)"
    if run.score_without_java:
        text = "pycocoevalcap BLEU, ROUGE-L, CIDEr on Python-tokenized text (no Java: no METEOR)"
    if task == "densecap" and run.densecap_map:
        text += "; DenseCap mAP as DynRefer's Python port computes it"
    return text


def shards_card(source: dict, scored: int, model: dict, java: bool = True) -> dict[str, Any]:
    """The card of a test on the shards' test split (the synthetic benchmark or our converters' output)."""
    from fineregion_pl.data.protocols import SHARDS_PROTOCOLS, SHARDS_SECTIONS

    reasons = ["our own test split: no published protocol reads it"]
    if scored < source["expected_regions"]:
        reasons.append(f"{scored} of the manifests' {source['expected_regions']} regions scored (at most max_regions={source['max_regions']} per image)")
    card = {
        "protocol": source["protocol"],
        "summary": SHARDS_PROTOCOLS[source["protocol"]],
        "sections": {section: name.format(source=source["protocol"]) for section, name in SHARDS_SECTIONS.items()},
        "annotations": source["files"],
        "items": {"unit": "regions", "scored": scored, "in_file": source["expected_regions"], "expected": source["expected_regions"]},
        "scorer": "captions: COCOEvalCap steps against every reference of a region; gt-ranking: acc@0.5 with chance",
        "metric_tokenizer": PTB_TOKENIZER if java else PYTHON_TOKENIZER,
        "comparable": False,
        "not_comparable_because": reasons,
    }
    card.update(model)
    card["code_version"] = code_version()
    return card


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a Markdown list (printed above the results table)."""
    lines = [f"- **protocol**: `{card['protocol']}`: {card.get('summary', '')}"]
    files = card["annotations"] if isinstance(card["annotations"], list) else [card["annotations"]]
    for f in files:
        lines.append(f"- **annotations**: `{f['file']}` sha256 `{f['sha256']}`" + (f" ({f['format']})" if f.get("format") else ""))
    if card.get("proposals"):
        lines.append(f"- **proposals**: `{card['proposals']['file']}` sha256 `{card['proposals']['sha256']}`")
    if card.get("predictions"):
        for name, digest in zip(card["predictions"]["files"], card["predictions"]["sha256"]):
            lines.append(f"- **predictions**: `{name}` sha256 `{digest}`")
    items = card["items"]
    expected = f", published set: {items['expected']}" if items.get("expected") else ""
    lines.append(f"- **items**: {items['scored']} {items['unit']} scored of {items['in_file']} in the file{expected}")
    lines.append(f"- **scorer**: {card['scorer']}")
    if card.get("metric_tokenizer"):
        lines.append(f"- **metric tokenizer**: {card['metric_tokenizer']}")
    for key in ("lm_tokenizer", "prompt", "decoding", "checkpoint", "world_size"):
        value = card.get(key)
        lines.append(f"- **{key.replace('_', ' ')}**: {_plain(value) if value is not None else 'not known (scored from a predictions file)'}")
    if card.get("rows_per_rank"):
        lines.append(f"- **prediction rows per rank**: {card['rows_per_rank']} (merged on rank 0, each item once)")
    if card.get("sections"):
        lines.append("- **sections**: " + ", ".join(f"`{section}` = {name}" for section, name in card["sections"].items()))
    version = card["code_version"]
    commit = f", git {version['git_commit'][:12]}{' (with uncommitted changes)' if version['git_dirty'] else ''}" if version.get("git_commit") else ""
    lines.append(f"- **code**: fineregion_pl {version['fineregion_pl']}{commit}")
    if version.get("libraries"):
        lines.append("- **libraries**: " + ", ".join(f"{name} {v}" for name, v in version["libraries"].items()))
    if card.get("comparable_with"):
        lines.append(f"- **comparable with**: {card['comparable_with']}; **not with**: {card['not_comparable_with']}")
    verdict = ("yes in method; the file is the published one only if its SHA-256 above is the published file's (no published digest is known here to check)"
               if card["comparable"] else "NO: " + "; ".join(card["not_comparable_because"]))
    lines.append(f"- **comparable with published numbers**: {verdict}")
    return "\n".join(lines)


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items() if v is not None)
    return f"`{value}`" if isinstance(value, str) else str(value)
