"""``fineregion-pl convert-zero``: a DeepSpeed ZeRO checkpoint folder as one Lightning checkpoint file.

Under DeepSpeed a Lightning "checkpoint" is a folder (``last.ckpt/latest``,
``last.ckpt/checkpoint/*_model_states.pt``, ``*_optim_states.pt``), with the weights spread over the
ranks' optimizer shards and, with ``exclude_frozen_parameters``, without frozen weights. The file
written here is what a DDP run saves: ``state_dict`` (fp32, gathered from every shard), the
hyper-parameters and the loop state, holding only tensors and plain values, so
``read_checkpoint`` (``torch.load(weights_only=True)``), stage 2's ``init_from`` and ``--ckpt_path``,
``export`` and ``RegionCaptioner.from_checkpoint`` take it like any other checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
from pathlib import Path
from typing import Any, Optional

import torch

from fineregion_pl.model.checkpoint_files import check_weights_fit
from fineregion_pl.model.errors import BadInputError

# what DeepSpeed adds to a checkpoint next to Lightning's own keys: bookkeeping that means nothing
# outside a DeepSpeed engine (and whose values are not all plain)
DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config",
    "ds_version", "universal_checkpoint_info", "csr_tensor_module_names", "sparse_tensor_module_names",
})


def convert_zero(*, ckpt_dir: str, out: str, init_from: Optional[str] = None, model_class: Optional[str] = None, seed: int = 0,
                 trust_pickle: bool = False) -> Path:
    """Convert a DeepSpeed (ZeRO-2/3) checkpoint folder into one Lightning checkpoint file.

    Weights are gathered from every rank's shard in fp32 (Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict``). Weights that were frozen in training and
    left out of the folder (``exclude_frozen_parameters``) are taken from where training took
    them: the module is rebuilt from the checkpoint's hyper-parameters (stage 2: the stage-1
    checkpoint in ``init_from``; stage 1: the encoder's pretrained weights). Stage 2's frozen base
    LM is left out, as in every stage-2 checkpoint: loading fills it in from the base model.

    Args:
        ckpt_dir: the folder a DeepSpeed run saved (``runs/stage2/checkpoints/last.ckpt``: it holds
            ``latest`` and ``checkpoint/``).
        out: the checkpoint file to write (``runs/stage2/last-fp32.ckpt``); its folder is created.
        init_from: the stage-1 checkpoint a stage-2 run started from, when it is no longer at the
            path saved in the checkpoint (default: that path).
        model_class: the LightningModule's class path (default: the one LightningCLI saved in the
            hyper-parameters, else ``Stage2Module`` when there is a ``language_model``, else ``Stage1Module``).
        seed: the run's ``seed_everything``: frozen weights that were randomly initialised (a
            frozen stage of an encoder trained without pretrained weights) are rebuilt with it.
        trust_pickle: DeepSpeed's reader unpickles its files in full (``weights_only=False``),
            which runs any code a crafted file names. Without this flag every file of the folder is
            first read with ``weights_only=True``, and a file that needs more is refused, naming it
            and what it needs; give ``--trust_pickle true`` only for a folder your own runs wrote.

    Returns:
        The path of the written checkpoint.
    """
    from lightning.pytorch.utilities.deepspeed import (
        convert_zero_checkpoint_to_fp32_state_dict,
    )

    source = Path(ckpt_dir).resolve()
    if not source.is_dir() or not (source / "latest").is_file():
        what = "a file (already a single checkpoint?)" if source.is_file() else "not a DeepSpeed checkpoint folder"
        raise BadInputError(
            f"convert-zero: {ckpt_dir} is {what}: expected the folder a DeepSpeed run saved, holding a 'latest' file "
            f"and the tag folder it names (e.g. runs/stage2/checkpoints/last.ckpt/)"
        )
    if not trust_pickle:
        _check_safe_pickles(source)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = convert_zero_checkpoint_to_fp32_state_dict(str(source), str(target))
    checkpoint = {k: v for k, v in checkpoint.items() if k not in DEEPSPEED_KEYS}
    state = {k: v.detach().cpu().contiguous() for k, v in checkpoint["state_dict"].items()}
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if init_from is not None:
        hparams["init_from"] = init_from
        checkpoint["hyper_parameters"] = hparams
    filled = _fill_frozen_weights(state, hparams, model_class, source, seed)
    checkpoint["state_dict"] = state
    checkpoint["converted_from_zero"] = {"folder": str(source), "filled_frozen": len(filled)}
    _save_plain(checkpoint, target)
    print(f"convert-zero: wrote {target} ({len(state)} tensors, {len(filled)} frozen filled in from the module's sources)")
    return target


def _check_safe_pickles(source: Path) -> None:
    """Refuse a folder with a file that ``torch.load(weights_only=True)`` will not read (it names
    Python objects beyond tensors and plain values, so reading it in full could run code)."""
    tag = (source / "latest").read_text(encoding="utf-8").strip()
    for path in sorted((source / tag).rglob("*.pt")) if (source / tag).is_dir() else []:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError
            needs = str(err).split("Unsupported global:")[-1].strip().splitlines()[0][:120] if "Unsupported global" in str(err) else str(err).splitlines()[0][:120]
            raise BadInputError(
                f"convert-zero: {path} cannot be read safely (weights_only=True: {needs}); DeepSpeed reads it with full unpickling, "
                "which runs any code a crafted file holds: pass --trust_pickle true only if your own run wrote this folder"
            ) from None


def _module_class(hparams: dict[str, Any], model_class: Optional[str]) -> type:
    path = model_class or hparams.get("_class_path")
    if path is None:
        path = "fineregion_pl.train.stage2.Stage2Module" if "language_model" in hparams else "fineregion_pl.train.stage1.Stage1Module"
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise BadInputError(f"convert-zero: cannot import the model class {path!r} (give --model_class): {err}") from err


def _fill_frozen_weights(state: dict[str, torch.Tensor], hparams: dict[str, Any], model_class: Optional[str], source: Path, seed: int) -> list[str]:
    """Put into ``state`` the frozen weights and buffers a rebuilt module has and ``state`` lacks; returns their keys.

    Raises a ``BadInputError`` (a ``ValueError``) when a trainable weight is missing (the folder is incomplete).
    """
    cls = _module_class(hparams, model_class)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # as the CLI's seed_everything before it builds the model
            module = cls(**kwargs)
            if hasattr(module, "load_initial_weights"):  # stage 2: the frozen vision parts come from init_from
                module.load_initial_weights()
    except (FileNotFoundError, BadInputError) as err:
        raise BadInputError(f"convert-zero: rebuilding {cls.__name__} for its frozen weights failed: {err} (give --init_from PATH)") from err
    own = module.state_dict()
    params = dict(module.named_parameters(remove_duplicate=False))
    frozen = {k for k in own if k not in params or not params[k].requires_grad}  # frozen weights and buffers
    # stage 2's LM and prompt are not built here (the frozen base LM stays out of every stage-2
    # checkpoint anyway): their trained keys are taken as they are, without a fit check
    inner = getattr(getattr(module, "model", None), "_modules", {})
    unbuilt = tuple(f"model.{part}." for part in ("language", "prompt") if "vision" in inner and part not in inner)
    comparable = {k: v for k, v in state.items() if not (unbuilt and k.startswith(unbuilt))}
    check_weights_fit(own, comparable, f"convert-zero: {source}", f"{cls.__name__} (is it a checkpoint of this model? give --model_class)", may_miss=frozen)
    missing = [k for k in own if k not in state]
    for key in missing:
        state[key] = own[key].detach().cpu().contiguous()
    return missing


def _save_plain(checkpoint: dict[str, Any], target: Path) -> None:
    """Save ``checkpoint`` to ``target`` and check it loads with ``weights_only=True``; name the entries that do not."""
    partial = target.with_name(target.name + ".partial")
    torch.save(checkpoint, partial)
    try:
        torch.load(partial, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        partial.unlink()
        bad = [key for key, value in checkpoint.items() if key != "state_dict" and not _loads_safely(value)]
        raise BadInputError(f"convert-zero: entries {bad} of the checkpoint are not plain values or tensors: {str(err).splitlines()[0]}") from err
    os.replace(partial, target)


def _loads_safely(value: Any) -> bool:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True
