"""Checkpoints under faults: a blown-up learning rate, a full disk, a truncated file, another base
LM, an unsafe DeepSpeed pickle. Each promise of the README is checked by the fault itself."""

from __future__ import annotations

import os
import resource
import shutil
import signal

import lightning as L
import pytest
import torch
from conftest import tiny_encoder_config, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from fineregion_pl import RegionDataModule, Stage1Module
from fineregion_pl.commands.convert_zero import convert_zero
from fineregion_pl.model.captioner import RegionCaptioner
from fineregion_pl.model.errors import BadInputError, NonFiniteLossError
from fineregion_pl.train.checkpoint_io import AtomicCheckpointIO


class BlowUpAt(Callback):
    """Sets every learning rate to ``lr`` before step ``step``: a schedule that explodes."""

    def __init__(self, step: int, lr: float = 1e30):
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def stage1_run(tmp_path, synthetic_data, steps: int, callbacks: list, checkpoint_every: int = 0):
    L.seed_everything(0)
    module = Stage1Module(encoder=tiny_encoder_config(), num_classes=5, warmup_steps=0)
    data = RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)
    if checkpoint_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step}", auto_insert_metric_name=False, every_n_train_steps=checkpoint_every,
                                                 save_top_k=-1, save_last=True, enable_version_counter=False)]
    trainer = tiny_trainer(tmp_path, max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(checkpoint_every), limit_val_batches=0)
    return module, trainer, data


def test_a_blown_up_step_never_reaches_a_checkpoint(tmp_path, synthetic_data):
    module, trainer, data = stage1_run(tmp_path, synthetic_data, steps=6, callbacks=[BlowUpAt(2)], checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="stopped before the checkpoint of step 3 was written"):
        trainer.fit(module, data)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["last.ckpt", "step1.ckpt", "step2.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_the_gate_leaves_a_healthy_run_unchanged(tmp_path, synthetic_data):
    module_a, trainer_a, data_a = stage1_run(tmp_path / "a", synthetic_data, steps=3, callbacks=[], checkpoint_every=1)
    trainer_a.fit(module_a, data_a)
    module_b, trainer_b, data_b = stage1_run(tmp_path / "b", synthetic_data, steps=3, callbacks=[], checkpoint_every=0)
    trainer_b.fit(module_b, data_b)
    for (name, a), b in zip(module_a.state_dict().items(), module_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_full_disk_leaves_the_previous_checkpoint_whole(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) * 2, hard))
    try:
        with pytest.raises((OSError, RuntimeError)):  # torch reports the failed write as a RuntimeError
            io.save_checkpoint({"step": 2, "w": torch.ones(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary file left behind


def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(10_000)}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(BadInputError, match=f"cannot read checkpoint {path} \\(truncated or not a checkpoint\\?\\)") as err:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_different_base_lm_at_the_saved_path_is_refused(stage2_checkpoint, tiny_lm, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = torch.load(stage2_checkpoint, weights_only=True)
    assert set(checkpoint["frozen_lm_fingerprint"]) == {"sha256"}
    same, other = tmp_path / "same-lm", tmp_path / "other-lm"
    shutil.copytree(tiny_lm, same)
    shutil.copytree(tiny_lm, other)
    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3  # same shapes, other values: loads without a word before
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    for folder in (same, other):
        checkpoint["hyper_parameters"]["language_model"]["name_or_path"] = str(folder)
        torch.save(checkpoint, tmp_path / f"{folder.name}.ckpt")
    RegionCaptioner.from_checkpoint(tmp_path / "same-lm.ckpt")  # the same bytes elsewhere: fine
    with pytest.raises(BadInputError, match="was trained on a different base LM than the one at .*other-lm \\(sha256 "):
        RegionCaptioner.from_checkpoint(tmp_path / "other-lm.ckpt")
    RegionCaptioner.from_checkpoint(tmp_path / "other-lm.ckpt", allow_other_base_lm=True)


class Payload:
    """Unpickling this runs code (it creates a file): what a crafted DeepSpeed file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_convert_zero_refuses_unsafe_pickles_without_consent(tmp_path):
    folder = tmp_path / "last.ckpt"
    (folder / "tag").mkdir(parents=True)
    (folder / "latest").write_text("tag")
    marker = tmp_path / "code-ran"
    torch.save({"module": {"w": torch.ones(1)}, "extra": Payload(marker)}, folder / "tag" / "mp_rank_00_model_states.pt")
    with pytest.raises(BadInputError, match="mp_rank_00_model_states.pt cannot be read safely .*pass --trust_pickle true only if"):
        convert_zero(ckpt_dir=str(folder), out=str(tmp_path / "out.ckpt"))
    assert not marker.exists()
