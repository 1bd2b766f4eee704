"""LTX-Video backbone (LTXVideoTransformer3DModel on packed tokens + AutoencoderKLLTXVideo + T5, flow matching).

A tiny random-weight pipeline of the real classes saved by diffusers' own ``LTXPipeline.save_pretrained``
(``fastdm.testing.build_tiny_ltx_model``: its VAE compresses 4x in space and time, the real one 32x / 8x),
loaded through fastdm's loader, offline, on the CPU; checked against the diffusers pipeline's own packing,
prompt encoding and transformer call.
"""

import json

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline
from fastdm.backbone import load_backbone
from fastdm.cli import main as edit_main
from fastdm.errors import FastDMError
from fastdm.taps import KeyTaps

FRAMES, SIZE = 9, 32  # 3 latent frames of 8 x 8 tokens
SRC, TGT = "a red circle moving right", "a blue circle moving right"


@pytest.fixture(scope="module")
def ltx_model(tmp_path_factory):
    from fastdm.testing import build_tiny_ltx_model

    return str(build_tiny_ltx_model(tmp_path_factory.mktemp("ltx") / "model", native_size=(SIZE, SIZE), frames=FRAMES))


@pytest.fixture(scope="module")
def ltx(ltx_model):
    return load_backbone(ltx_model)


def _clip():
    from fastdm.toyworld.world import render_clip

    return np.ascontiguousarray(render_clip("red", "circle", "right", size=SIZE, frames=FRAMES, radius=8, speed=2))


def test_folder_saved_by_ltxpipeline_loads(ltx, ltx_model):
    index = json.loads(open(f"{ltx_model}/model_index.json").read())
    assert index["_class_name"] == "LTXPipeline" and index["transformer"] == ["diffusers", "LTXVideoTransformer3DModel"]
    info = ltx.info
    assert type(ltx).__name__ == "LTXBackbone" and (info.space, info.prediction_type) == ("latent", "flow")
    assert (ltx.spatial_ratio, ltx.temporal_ratio, info.size_multiple) == (4, 4, 4)
    assert ltx.native_frames() == 3 and ltx.text_embedding_shape() == (16, 32)
    x = ltx.to_working(torch.rand(FRAMES, 3, SIZE, SIZE) * 2 - 1)
    assert x.shape == ltx.working_shape(FRAMES, (SIZE, SIZE)) == (1, 8, 3, 8, 8)
    assert ltx.from_working(x).shape == (FRAMES, 3, SIZE, SIZE)
    assert "4k+1" in ltx.frame_count_problem(8) and ltx.frame_count_problem(13) is None
    assert ltx.working_to_video_range(1, 3) == (1, 9)


def test_velocity_equals_the_pipelines_own_transformer_call(ltx, ltx_model):
    """Packing, text mask, timestep and RoPE scale as LTXPipeline's denoising loop passes them."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(ltx_model)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 3, 8, 8)
    packed = LTXPipeline._pack_latents(x, 1, 1)
    assert torch.equal(ltx._pack(x), packed) and torch.equal(ltx._unpack(packed, 3, 8, 8), x)
    embeds, mask, _, _ = pipe.encode_prompt(SRC, do_classifier_free_guidance=False, max_sequence_length=16)
    t = 600
    s = ltx.sigma(t)
    with torch.no_grad():
        want = pipe.transformer(hidden_states=packed, encoder_hidden_states=embeds, timestep=torch.tensor([s * 1000.0]),
                                encoder_attention_mask=mask, num_frames=3, height=8, width=8,
                                rope_interpolation_scale=(4 / 25, 4, 4), return_dict=False)[0]
        got = ltx.denoiser_forward(x, torch.tensor([t]), ltx.encode_prompts([SRC]))
    assert torch.allclose(got, LTXPipeline._unpack_latents(want, 3, 8, 8, 1, 1), atol=1e-5)


def test_noise_prediction_of_an_exact_velocity_is_the_noise(ltx):
    """For data that is one point x0, the true velocity at x_t = (1-s) x0 + s e is e - x0; its noise prediction
    must give back e exactly (the conversion V-DDS runs on)."""
    torch.manual_seed(1)
    x0, e = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 8, 3, 8, 8)
    for t in (60, 500, 940):
        a, b = ltx.noise_coefficients(t)
        x_t = a * x0 + b * e
        assert torch.allclose(ltx.to_noise_prediction(e - x0, x_t, t), e, atol=1e-5)


def test_keys_are_the_video_tokens_before_rope_frame_major(ltx):
    torch.manual_seed(2)
    x = torch.randn(1, 8, 3, 8, 8)
    text = ltx.encode_prompts([SRC])
    attn = ltx.transformer.transformer_blocks[1].attn1
    seen = {}
    hook = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.__setitem__("h", args[0] if args else kwargs["hidden_states"]),
                                          with_kwargs=True)
    try:
        with KeyTaps(ltx, ["transformer_blocks.1.attn1"]) as taps, torch.no_grad():
            ltx.predict_noise(x, 400, text)
            keys = taps.take(FRAMES)["transformer_blocks.1.attn1"]
    finally:
        hook.remove()
    with torch.no_grad():
        mine = attn.norm_k(attn.to_k(seen["h"]))
    assert keys.shape == (1, 3, 64, 32) and torch.allclose(keys.reshape(1, 192, 32), mine, atol=1e-6)
    assert ltx.key_module("transformer_blocks.1.attn1") is attn.norm_k


def test_edit_through_the_pipeline_and_the_command(ltx_model, tmp_path, capsys):
    pipe = DreamMotionPipeline.from_pretrained(ltx_model)
    res = pipe(_clip(), SRC, TGT, steps=2, seed=0, lr=0.05, mask=None)
    assert res.report["model"]["class"] == "LTXVideoTransformer3DModel" and res.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert res.report["tap_layers"] == ["transformer_blocks.1.attn1"]
    assert all(np.isfinite(v) for v in res.report["final_losses"].values())
    import imageio.v3 as iio

    clip = tmp_path / "clip.gif"
    iio.imwrite(clip, _clip(), extension=".gif", duration=125, loop=0)
    out = tmp_path / "edit.mp4"
    code = edit_main([str(clip), "--model", ltx_model, "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "2",
                      "--guidance-scale", "3", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps_run"] == 2 and report["auto_mask"]["words"] == {"source": ["red"], "target": ["blue"]}


def test_schedulers_that_shift_by_resolution_are_refused(ltx_model, tmp_path):
    import shutil

    for key, value, match in (("use_dynamic_shifting", True, "dynamic"), ("shift_terminal", 0.1, "shift_terminal")):
        folder = tmp_path / key
        shutil.copytree(ltx_model, folder)
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg[key] = value
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(FastDMError, match=match):
            load_backbone(str(folder))


def test_a_family_fastdm_does_not_run_is_refused_with_what_it_runs(ltx):
    from diffusers import MochiTransformer3DModel

    from fastdm.backbone.components import from_components
    from fastdm.errors import Unsupported

    mochi = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
                                    in_channels=4, text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
    with pytest.raises(Unsupported, match=r"unsupported denoiser class MochiTransformer3DModel; fastdm runs UNet3DConditionModel "
                                          r".*WanTransformer3DModel .*LTXVideoTransformer3DModel .*CogVideoXTransformer3DModel"):
        from_components(transformer=mochi, text_encoder=ltx.text_encoder, tokenizer=ltx.tokenizer, scheduler=None, path="x")
