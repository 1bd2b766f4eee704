"""Feature taps: keys of chosen layers, output unchanged, gradients reach the input."""

import pytest
import torch

from fastdm.errors import FastDMError
from fastdm.losses import spatial_ssm_loss, temporal_ssm_loss
from fastdm.taps import KeyTaps, resolve_layers


def test_default_layers_are_decoder_spatial_self_attention(editor):
    layers = resolve_layers(editor.backbone, None)
    assert layers == editor.backbone.default_tap_layers()
    assert layers and all(n.startswith("up_blocks.1.attentions.") and n.endswith(".attn1") for n in layers)
    assert not any("temp_attentions" in n for n in editor.backbone.spatial_self_attention_layers())


def test_patterns_select_layers(editor):
    all_layers = resolve_layers(editor.backbone, ["*"])
    assert any(n.startswith("down_blocks") for n in all_layers) and any(n.startswith("up_blocks") for n in all_layers)
    assert resolve_layers(editor.backbone, ["down_blocks.0.*"]) == [n for n in all_layers if n.startswith("down_blocks.0.")]
    with pytest.raises(FastDMError, match="no spatial self-attention layer matches"):
        resolve_layers(editor.backbone, ["up_blocks.9.*"])


def test_taps_do_not_change_output_and_give_per_frame_keys(editor):
    bb = editor.backbone
    text = bb.encode_prompts(["a red circle moving right"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 16, 16, generator=gen)
    with torch.no_grad():
        plain = bb.predict_noise(x, 500, text)
    layers = resolve_layers(bb, None)
    with KeyTaps(bb, layers) as taps, torch.no_grad():
        tapped = bb.predict_noise(x, 500, text)
        keys = taps.take(num_frames=4)
    assert torch.equal(plain, tapped)
    for n in layers:
        assert keys[n].shape[:3] == (1, 4, 16 * 16)  # (B, F, N = H*W of the tapped level, C): full res here
    # hooks are removed on exit
    assert all(not m.to_k._forward_hooks for m in bb.spatial_self_attention_layers().values())


def test_ssm_gradient_reaches_the_video(editor):
    bb = editor.backbone
    text = bb.encode_prompts(["a red circle moving right"])
    gen = torch.Generator().manual_seed(0)
    x_src = torch.randn(1, 3, 4, 16, 16, generator=gen)
    x = (x_src + 0.3 * torch.randn(x_src.shape, generator=gen)).requires_grad_(True)
    layers = resolve_layers(bb, None)
    with KeyTaps(bb, layers) as taps:
        with torch.no_grad():
            bb.predict_noise(x_src, 300, text)
            ref = taps.take(4)
        bb.predict_noise(x, 300, text)
        keys = taps.take(4)
    loss = sum(spatial_ssm_loss(keys[n], ref[n]) + temporal_ssm_loss(keys[n], ref[n]) for n in layers)
    loss.backward()
    assert loss.item() > 0 and x.grad is not None and x.grad.abs().sum() > 0
