"""The region encoder: any timm Swin, local pretrained weights, frozen stages, checkpointing."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_BACKBONE_KWARGS

from fineregion_pl.model.encoder import RegionEncoder, create_backbone, whole_image_boxes
from fineregion_pl.model.errors import BadInputError


def encode(encoder: RegionEncoder, images, boxes, masking: str = "dynamic"):
    """What the vision model runs at evaluation: features once, every region pooled; ``(z, context)``."""
    size = tuple(images.shape[-2:])
    features = encoder.forward_features(images)
    if masking == "none":
        boxes = whole_image_boxes(boxes, size)
    z, _ = encoder.pool(features, boxes, size, hard=masking == "hard")
    return z, encoder.context(features)


def tiny(**kwargs) -> RegionEncoder:
    values = dict(backbone="swin_tiny_patch4_window7_224", feature_levels=[1, 2], backbone_kwargs=dict(TINY_BACKBONE_KWARGS))
    values.update(kwargs)
    return RegionEncoder(**values)


def test_local_timm_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **TINY_BACKBONE_KWARGS)
    path = tmp_path / "swin.pth"
    torch.save(full.state_dict(), path)
    encoder = tiny(pretrained=str(path))
    assert torch.equal(encoder.backbone.patch_embed.proj.weight, full.patch_embed.proj.weight)
    assert torch.equal(encoder.backbone.layers_2.blocks[0].attn.qkv.weight, full.layers[2].blocks[0].attn.qkv.weight)
    random_init = tiny()
    assert not torch.equal(random_init.backbone.patch_embed.proj.weight, full.patch_embed.proj.weight)


def test_missing_weights_file_and_unknown_name_are_clear_errors(tmp_path):
    with pytest.raises(BadInputError, match="encoder weights file not found"):
        tiny(pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown timm model name 'swin_nonexistent'"):
        create_backbone("swin_nonexistent")


@pytest.mark.parametrize(
    "name, levels, size, expected",
    [
        ("swin_tiny_patch4_window7_224", [0, 1, 2], 64, [(16, 16, 16), (8, 8, 32), (4, 4, 64)]),
        ("swinv2_tiny_window8_256", [1, 2], 64, [(8, 8, 32), (4, 4, 64)]),
        ("swin_tiny_patch4_window7_224", [2], 96, [(6, 6, 64)]),
    ],
)
def test_feature_levels_names_and_input_sizes(name, levels, size, expected):
    kwargs = dict(TINY_BACKBONE_KWARGS, img_size=size)
    encoder = RegionEncoder(name, feature_levels=levels, backbone_kwargs=kwargs)
    features = encoder.forward_features(torch.randn(2, 3, size, size))
    assert [tuple(f.shape[1:]) for f in features] == expected
    boxes = torch.tensor([[[0.0, 0.0, size / 2, size / 2], [0.0, 0.0, 0.0, 0.0]]]).expand(2, -1, -1)
    z, context = encode(encoder, torch.randn(2, 3, size, size), boxes)
    assert z.shape == (2, 2, sum(d for *_, d in expected)) and context.shape == (2, z.shape[-1])
    assert torch.all(z[:, 1] == 0)  # the padding box pools to zeros


def test_freeze_first_stages():
    encoder = tiny(freeze_stages=2)
    frozen = {n.split(".")[0] for n, p in encoder.backbone.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert frozen == {"patch_embed", "layers_0", "layers_1"} and trainable == {"layers_2"}


def test_gradient_checkpointing_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    plain = tiny()
    checkpointed = tiny(grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 4.0, 40.0, 30.0]]]).expand(2, -1, -1)
    grads = []
    for model in (plain, checkpointed):
        model.eval()  # no stochastic depth: the two runs must compute the same thing
        encode(model, images, boxes)[0].sum().backward()
        grads.append(model.backbone.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_masking_none_pools_the_whole_image_for_every_region():
    encoder = tiny().eval()
    images = torch.randn(1, 3, 64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [32.0, 32.0, 64.0, 64.0]]])
    z, context = encode(encoder, images, boxes, masking="none")
    torch.testing.assert_close(z[0, 0], z[0, 1])
    torch.testing.assert_close(z[0, 0], context[0], rtol=1e-5, atol=1e-6)
    regional, _ = encode(encoder, images, boxes, masking="dynamic")
    assert not torch.allclose(regional[0, 0], regional[0, 1])
