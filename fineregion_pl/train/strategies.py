"""Lightning strategies that YAML configs can name (``configs/strategies/``), made aware of our models.

Lightning and DeepSpeed do the distribution; this file only adapts their strategies to what a
config can say and to what a LoRA model needs:

- :class:`RegionFSDPStrategy`: FSDP that wraps (and optionally activation-checkpoints) the blocks
  named by dotted class paths, since a YAML file cannot hold a set of classes.
- :class:`RegionFSDP2Strategy`: PyTorch's FSDP2 (``fully_shard``) through Lightning's
  ``ModelParallelStrategy``, one unit per named block; the FSDP path that also runs on CPU ranks.
- :class:`RegionDeepSpeedStrategy`: DeepSpeed with frozen weights left out of checkpoints, a
  ZeRO-3 that can build a Hugging Face LM sharded in ``configure_model``, and resumption from its
  own frozen-weight-free checkpoints.
"""

from __future__ import annotations

import importlib
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from fineregion_pl.lightning_private import fit_dataloader, rekey_optimizer_state, validate_deepspeed_checkpoint_directory
from fineregion_pl.model.checkpoint_files import check_weights_fit
from fineregion_pl.model.errors import BadInputError
from fineregion_pl.model.vision_model import RegionVisionModel

SWIN_BLOCK = "timm.models.swin_transformer.SwinTransformerBlock"
LM_BLOCKS = (
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer",
)
DEFAULT_WRAP_BLOCKS = (SWIN_BLOCK, *LM_BLOCKS)


def import_classes(names: Sequence[str], what: str = "class") -> set[type[nn.Module]]:
    """The ``nn.Module`` classes named by dotted paths (``timm.models.swin_transformer.SwinTransformerBlock``).

    Raises a ``BadInputError`` (a ``ValueError``) naming the entry that is not a dotted path,
    cannot be imported or is not an ``nn.Module`` subclass.
    """
    classes: set[type[nn.Module]] = set()
    for name in names:
        module_name, _, class_name = str(name).rpartition(".")
        if not module_name:
            raise BadInputError(f"{what}: {name!r} is not a dotted class path (like '{SWIN_BLOCK}')")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise BadInputError(f"{what}: cannot import module {module_name!r} of {name!r}: {err}") from err
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise BadInputError(f"{what}: {module_name!r} has no nn.Module class {class_name!r} (from {name!r})")
        classes.add(cls)
    return classes


def as_timedelta(value: Any) -> Any:
    """``"h:m:s"`` or ``"d days, h:m:s"`` (how configs write a timeout) as a ``timedelta``; anything else as is."""
    if not isinstance(value, str):
        return value
    days, _, clock = value.rpartition(",")
    try:
        hours, minutes, seconds = (float(part) for part in clock.strip().split(":"))
        whole_days = int(days.split()[0]) if days.strip() else 0
    except (ValueError, IndexError) as err:
        raise BadInputError(f"timeout {value!r} is not 'h:m:s' (e.g. '0:10:00')") from err
    return timedelta(days=whole_days, hours=hours, minutes=minutes, seconds=seconds)


class RegionFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with the wrapping and activation-checkpointing policies given as class names.

    Each instance of a ``wrap_blocks`` class becomes its own FSDP unit (its weights are gathered
    only while it runs); classes that the model does not contain are harmless, so one list can
    cover several LM families.

    Args:
        wrap_blocks: dotted class paths of the blocks to wrap (the Swin block and the LM's decoder
            layer, e.g. ``transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer``).
        checkpoint_blocks: dotted class paths of the blocks whose activations are recomputed in
            backward (``None``: none; the LM's own ``gradient_checkpointing`` is the alternative).
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``NO_SHARD`` or ``HYBRID_SHARD``
            (shard inside a node, replicate across nodes; needs ``device_mesh``).
        device_mesh: ``(replicas, shards)`` for ``HYBRID_SHARD``, e.g. ``[num_nodes, gpus_per_node]``.
        state_dict_type: ``full`` (one ``.ckpt`` file, gathered on rank 0) or ``sharded`` (a folder).
        cpu_offload: keep parameters and gradients in CPU memory between uses.
        use_orig_params: keep the original parameters visible; required when frozen and trainable
            weights share an FSDP unit (LoRA, a frozen head).
        limit_all_gathers: rate-limit all-gathers (lower peak memory).
        timeout: collective timeout (``"h:m:s"``): a lost rank stops the others after this long.
        process_group_backend: ``nccl`` / ``gloo`` (default: the accelerator's).
    """

    def __init__(
        self,
        wrap_blocks: Sequence[str] = DEFAULT_WRAP_BLOCKS,
        checkpoint_blocks: Optional[Sequence[str]] = None,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"] = "FULL_SHARD",
        device_mesh: Optional[tuple[int, int]] = None,
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        use_orig_params: bool = True,
        limit_all_gathers: bool = True,
        timeout: Optional[timedelta] = timedelta(minutes=10),
        process_group_backend: Optional[str] = None,
    ):
        self.wrap_blocks = list(wrap_blocks)
        self.checkpoint_blocks = list(checkpoint_blocks or [])
        wrap = import_classes(self.wrap_blocks, "RegionFSDPStrategy.wrap_blocks")
        checkpoint = import_classes(self.checkpoint_blocks, "RegionFSDPStrategy.checkpoint_blocks")
        super().__init__(
            auto_wrap_policy=wrap or None,
            activation_checkpointing_policy=checkpoint or None,
            sharding_strategy=sharding_strategy,
            device_mesh=tuple(device_mesh) if device_mesh else None,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            use_orig_params=use_orig_params,
            limit_all_gathers=limit_all_gathers,
            timeout=as_timedelta(timeout),
            process_group_backend=process_group_backend,
        )


class RegionFSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel with PyTorch's FSDP2 (``fully_shard``), for stage 2.

    Lightning's ``ModelParallelStrategy`` leaves the sharding to the module; this strategy does it
    for our modules: every instance of a ``wrap_blocks`` class (the Swin block, the LM's decoder
    layer) becomes its own FSDP unit, then the model as a whole, over one data-parallel mesh of all
    ranks (no tensor parallelism). Unlike FSDP1 (:class:`RegionFSDPStrategy`), FSDP2 also runs on
    CPU ranks over gloo, so this path is trained, saved and resumed by the CPU tests.

    Frozen and trainable weights may share a unit (LoRA). With ``save_distributed_checkpoint:
    false`` (the default) a save gathers one ``.ckpt`` file on rank 0, without the frozen base LM
    (the module leaves it out, as on every strategy), which ``test``, ``predict`` and ``export`` read
    as they are and ``--ckpt_path`` resumes from.

    Args:
        wrap_blocks: dotted class paths of the blocks that become FSDP units (classes the model
            does not contain are ignored).
        reshard_after_forward: free each unit's gathered weights after its forward (ZeRO-3-like,
            least memory); ``false`` keeps them until backward (ZeRO-2-like, less communication).
        save_distributed_checkpoint: ``true`` saves a folder with one shard per rank instead.
        timeout: collective timeout (``"h:m:s"``).
        process_group_backend: ``nccl`` / ``gloo`` (default: the accelerator's).
    """

    def __init__(
        self,
        wrap_blocks: Sequence[str] = DEFAULT_WRAP_BLOCKS,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        timeout: Optional[timedelta] = timedelta(minutes=10),
        process_group_backend: Optional[str] = None,
    ):
        self.wrap_blocks = list(wrap_blocks)
        self._wrap_classes = tuple(import_classes(self.wrap_blocks, "RegionFSDP2Strategy.wrap_blocks"))
        self.reshard_after_forward = reshard_after_forward
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            timeout=as_timedelta(timeout),
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        # every rank is a data-parallel replica holding a shard (Lightning's default would make the
        # ranks of a node one tensor-parallel group, which needs a tensor-parallel plan we do not have)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        from fineregion_pl.model.captioner import RegionCaptioner

        if not isinstance(getattr(module, "model", None), RegionCaptioner):
            raise BadInputError(f"RegionFSDP2Strategy shards stage 2 (Stage2Module); for {type(module).__name__} use configs/strategies/ddp.yaml")
        shard_blocks(module.model, self.device_mesh["data_parallel"], self._wrap_classes, self.reshard_after_forward)
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # the module's checkpoints leave the frozen base LM out: load what is there into the sharded
        # model, after checking that only frozen weights are missing
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            return super().load_checkpoint(path, weights_only)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from fineregion_pl.model.checkpoint_files import read_checkpoint

        checkpoint = read_checkpoint(path)
        module = self.lightning_module
        if module.strict_loading:
            check_only_frozen_missing(module, checkpoint["state_dict"], str(path))
        set_model_state_dict(module, checkpoint["state_dict"], options=StateDictOptions(full_state_dict=True, strict=False))
        if module.trainer.state.fn == "fit" and checkpoint.get("optimizer_states"):
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
                set_optimizer_state_dict(module, optimizer, rekey_optimizer_state(state, module), options=StateDictOptions(full_state_dict=True))
        return checkpoint


# RegionCaptioner's entry points that training and evaluation call instead of forward: FSDP2
# gathers the root unit's weights (patch embedding, norms, LM embedding, prompt) around these
ROOT_ENTRY_POINTS = ("losses", "encode", "describe_batch", "generate", "score", "question_prompts")


def shard_blocks(model: nn.Module, mesh: Any, block_classes: Sequence[type[nn.Module]], reshard_after_forward: bool = True) -> int:
    """Apply FSDP2's ``fully_shard`` to every instance of ``block_classes`` in ``model``, then to ``model``.

    The model's entry points (:data:`ROOT_ENTRY_POINTS` it has) are registered as forward methods
    so the root unit's weights are gathered while they run. Returns how many blocks became units.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = [m for m in model.modules() if isinstance(m, tuple(block_classes))]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root keeps its weights between entry points until backward (FSDP2's default for a root;
    # resharding it would free them between `encode` and the LM call inside `losses`)
    fully_shard(model, mesh=mesh)
    for name in ROOT_ENTRY_POINTS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return len(blocks)


class RegionDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` for LoRA models; takes every ``DeepSpeedStrategy`` argument.

    What it changes:

    - ``exclude_frozen_parameters`` is on by default: checkpoints hold the trained weights only
      (LoRA adapters, prompt, vision side), not a copy of the frozen base LM per save.
    - Resuming (``--ckpt_path`` a DeepSpeed folder, or SLURM's requeue) accepts such checkpoints:
      weights that are frozen now may be absent; any other missing or unexpected weight is an error.
      The module's ``on_load_checkpoint`` sees its restored ``state_dict`` (DeepSpeed keeps the
      weights out of the client state).
    - ZeRO-3: the LM is built in ``configure_model`` inside ``deepspeed.zero.Init`` and Hugging
      Face ``from_pretrained`` is told about it (``HfDeepSpeedConfig``), so each rank loads only its
      shard of the pretrained weights instead of failing on the empty placeholders.
    - ZeRO-Offload with our torch ``AdamW`` (several parameter groups): DeepSpeed would refuse a
      client optimizer unless ``zero_force_ds_cpu_optimizer`` is false, which is set (unless the
      config says otherwise).

    A ZeRO checkpoint folder becomes a plain Lightning checkpoint with ``fineregion-pl convert-zero``
    (:func:`fineregion_pl.commands.convert_zero.convert_zero`).
    """

    def __init__(self, *args: Any, exclude_frozen_parameters: bool = True, **kwargs: Any):
        if "timeout" in kwargs:
            kwargs["timeout"] = as_timedelta(kwargs["timeout"])
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        zero = self.config.get("zero_optimization", {}) if isinstance(self.config, dict) else {}
        if isinstance(zero, dict) and zero.get("offload_optimizer"):
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)
        self._hf_deepspeed_config = None

    def setup(self, trainer: Any) -> None:
        if self.zero_stage_3:
            cast_unpartitioned_parameters(self.lightning_module, self.precision_plugin.precision)
        super().setup(trainer)
        # DeepSpeed casts parameters to bf16/fp16 but keeps buffers (so the LM's rotary
        # frequencies stay fp32, as transformers keeps them); the vision side must run in one dtype
        for module in self.lightning_module.modules():
            if isinstance(module, RegionVisionModel):
                module.match_buffers_to_parameters()
        drop_tied_frozen_weights_on_save(self.deepspeed_engine)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.zero_stage_3:
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            self._init_config_if_needed()
            # transformers keeps only a weak reference: this object must stay alive while models load
            self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        with super().model_sharded_context():
            yield

    def _auto_select_batch_size(self) -> int:
        """Images per GPU for DeepSpeed's ``train_micro_batch_size_per_gpu`` (throughput bookkeeping).

        Lightning reads it from the loader's ``batch_sampler``; our streaming loaders yield whole
        batches and have none, so it comes from the DataModule's (or the dataset's) ``batch_size``.
        """
        trainer = self.lightning_module.trainer
        size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
        loader = fit_dataloader(trainer)
        if loader is not None:
            sampler = getattr(loader, "batch_sampler", None)
            size = sampler.batch_size if sampler is not None else getattr(getattr(loader, "dataset", None), "batch_size", None)
            if isinstance(size, int) and size > 0:
                return size
        return 1

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not self.exclude_frozen_parameters or (self.load_full_weights and self.zero_stage_3) or not Path(checkpoint_path).is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.pytorch.trainer.states import TrainerFn

        validate_deepspeed_checkpoint_directory(checkpoint_path)
        module = self.lightning_module
        assert module is not None
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        _, client_state = self.deepspeed_engine.load_checkpoint(
            checkpoint_path,
            load_optimizer_states=fitting,
            load_lr_scheduler_states=False,
            custom_load_fn=lambda src, dst: load_without_frozen(dst, src, strict=module.strict_loading, source=str(checkpoint_path)),
        )
        if client_state is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint_path} (expected its 'latest' file and tag folder)")
        client_state.setdefault("state_dict", module.state_dict())
        return client_state


HALF_PRECISIONS = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16", "16-true": "float16", "bf16": "bfloat16", "16": "float16"}


def cast_unpartitioned_parameters(module: nn.Module, precision: str) -> int:
    """Under ZeRO-3 in half precision, cast the weights built outside ``deepspeed.zero.Init`` (the
    vision side and the prompt; the LM is built inside it, already in the half dtype) to that dtype.

    DeepSpeed's ZeRO-3 optimizer keeps one flat buffer of every trainable partition and refuses
    mixed dtypes ("assert len(set(t.dtype for t in tensors)) == 1"); unlike ZeRO-1/2 its engine
    does not cast the module itself. fp32 master weights are still kept by the optimizer.
    Returns how many parameters were cast.
    """
    import torch

    name = HALF_PRECISIONS.get(str(precision))
    if name is None:
        return 0
    dtype = getattr(torch, name)
    cast = 0
    for param in module.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def drop_tied_frozen_weights_on_save(engine: Any) -> None:
    """Make ``engine``'s ``exclude_frozen_parameters`` saves drop tied aliases of frozen weights too.

    DeepSpeed lists frozen weights with ``named_parameters()``, which names a tied weight once: a
    tied LM head (``lm_head.weight`` = ``embed_tokens.weight``, frozen) stays in the saved state
    and takes the whole embedding with it (0.55 GB at Qwen2.5-0.5B's vocabulary).
    """
    original = engine.module_state_dict
    if getattr(original, "_drops_tied_frozen", False):
        return

    def module_state_dict(*args: Any, exclude_frozen_parameters: bool = False, **kwargs: Any) -> dict:
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    module_state_dict._drops_tied_frozen = True
    engine.module_state_dict = module_state_dict


def load_without_frozen(module: nn.Module, state_dict: dict[str, Any], strict: bool = True, source: str = "checkpoint") -> None:
    """``module.load_state_dict(state_dict)`` where weights that are frozen in ``module`` may be missing.

    With ``strict``, any other missing key and any unexpected key raise a
    :class:`~fineregion_pl.model.errors.BadInputError` naming them (only frozen weights may be absent).
    """
    if strict:
        check_only_frozen_missing(module, state_dict, source)
    module.load_state_dict(state_dict, strict=False)


def check_only_frozen_missing(module: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """A ``BadInputError`` naming any key of ``state_dict`` that ``module`` lacks, or any weight it
    misses that is not frozen in ``module`` (tied aliases of frozen weights count as frozen)."""
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    check_weights_fit(module.state_dict(), state_dict, source, f"{type(module).__name__} (only frozen weights may be absent)", may_miss=frozen)
