"""CogVideoX backbone (CogVideoXTransformer3DModel, joint text+video attention, v-prediction DDPM).

Tiny random-weight pipelines of the real classes saved by diffusers' own ``CogVideoXPipeline.save_pretrained``
(``fastdm.testing.build_tiny_cogvideox_model``: 1.0 with 3D RoPE, 1.5 with two latent frames per patch, 2B
with sin-cos positions), loaded through fastdm's loader, offline, on the CPU; checked against the pipeline's
own prompt encoding, RoPE tables and transformer call.
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

SIZE = 32  # 4 x 4 latent cells, 2 x 2 tokens a latent frame
SRC, TGT = "a red circle moving right", "a blue circle moving right"
FRAMES = {"1.0": 9, "1.5": 17, "2b": 9}  # 3, 5 (1.5: padded to 6 for its temporal patch of 2) and 3 latent frames


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fastdm.testing import build_tiny_cogvideox_model

    root = tmp_path_factory.mktemp("cogvideox")
    return {v: str(build_tiny_cogvideox_model(root / v, version=v, native_size=(SIZE, SIZE), frames=FRAMES[v])) for v in FRAMES}


def _clip(frames: int):
    from fastdm.toyworld.world import render_clip

    return np.ascontiguousarray(render_clip("red", "circle", "right", size=SIZE, frames=frames, radius=8, speed=2))


def test_folders_saved_by_cogvideoxpipeline_load(models):
    for version, folder in models.items():
        index = json.loads(open(f"{folder}/model_index.json").read())
        assert index["_class_name"] == "CogVideoXPipeline"
        bb = load_backbone(folder)
        assert type(bb).__name__ == "CogVideoXBackbone" and bb.info.prediction_type == "v_prediction"
        assert (bb.info.spatial_factor, bb.info.size_multiple, bb.text_length()) == (8, 16, 16)
        f = FRAMES[version]
        x = bb.to_working(torch.rand(f, 3, SIZE, SIZE) * 2 - 1)
        assert x.shape == bb.working_shape(f, (SIZE, SIZE)) == (1, 4, (f - 1) // 4 + 1, 4, 4)
        assert bb.from_working(x).shape == (f, 3, SIZE, SIZE)
    one_five = load_backbone(models["1.5"])
    assert "pass `frames=9`" in one_five.frame_count_problem(13) and one_five.frame_count_problem(17) is None
    assert one_five._pad(5) == 1 and load_backbone(models["1.0"])._pad(5) == 0


def test_noise_prediction_of_an_exact_v_is_the_noise(models):
    """Data = one point x0: at x_t = a x0 + b e the true v is a e - b x0; converted, it gives e back exactly. V-DDS
    subtracts two such noise predictions whose x_t differ (edited and source video): only in noise space is the
    difference the edit's."""
    bb = load_backbone(models["1.0"])
    torch.manual_seed(0)
    x0, x1, e = torch.randn(3, 1, 4, 3, 4, 4)
    for t in (50, 500, 950):
        a, b = bb.noise_coefficients(t)
        assert abs(a * a + b * b - 1) < 1e-9 and a == pytest.approx(float(bb.alphas_cumprod[t]) ** 0.5)
        e0 = bb.to_noise_prediction(a * e - b * x0, a * x0 + b * e, t)
        e1 = bb.to_noise_prediction(a * e - b * x1, a * x1 + b * e, t)
        assert torch.allclose(e0, e, atol=1e-5) and torch.allclose(e1, e, atol=1e-5)
        assert not torch.allclose(a * e - b * x0, a * e - b * x1)  # (in v-space the two branches differ)


@pytest.mark.parametrize("version", ["1.0", "1.5", "2b"])
def test_v_equals_the_pipelines_own_transformer_call(models, version):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(models[version])
    bb = load_backbone(models[version])
    f = (FRAMES[version] - 1) // 4 + 1
    torch.manual_seed(1)
    x = torch.randn(1, 4, f, 4, 4)
    embeds, _ = pipe.encode_prompt(SRC, do_classifier_free_guidance=False, max_sequence_length=16)
    # 1.5 fills its temporal patches with latent frames in front (the pipeline: noise; fastdm: the first frame)
    pad = (-f) % (pipe.transformer.config.patch_size_t or 1)
    xp = torch.cat([x[:, :, :1]] * pad + [x], 2)
    rope = pipe._prepare_rotary_positional_embeddings(SIZE, SIZE, f + pad, "cpu") \
        if pipe.transformer.config.use_rotary_positional_embeddings else None
    with torch.no_grad():
        want = pipe.transformer(hidden_states=xp.permute(0, 2, 1, 3, 4), encoder_hidden_states=embeds, timestep=torch.tensor([700]),
                                image_rotary_emb=rope, return_dict=False)[0].permute(0, 2, 1, 3, 4)[:, :, pad:]
        got = bb.denoiser_forward(x, torch.tensor([700]), bb.encode_prompts([SRC]))
    assert torch.allclose(got, want, atol=1e-5)


def test_keys_are_the_video_part_of_the_joint_attention_before_rope(models):
    bb = load_backbone(models["1.0"])
    attn = bb.transformer.transformer_blocks[1].attn1
    seen = {}
    hook = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    torch.manual_seed(2)
    x = torch.randn(1, 4, 3, 4, 4)
    try:
        with KeyTaps(bb, ["transformer_blocks.1.attn1"]) as taps, torch.no_grad():
            bb.predict_noise(x, 400, bb.encode_prompts([SRC]))
            keys = taps.take(FRAMES["1.0"])["transformer_blocks.1.attn1"]
    finally:
        hook.remove()
    with torch.no_grad():  # by hand: one projection over [text; video], heads, per-head LayerNorm, then the video part
        joint = torch.cat([seen["encoder_hidden_states"], seen["hidden_states"]], 1)
        k = attn.norm_k(attn.to_k(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2))
        video = k[:, :, 16:].transpose(1, 2).flatten(2)
    assert keys.shape == (1, 3, 4, 32)  # (batch, latent frames, tokens per frame, heads x head dim)
    assert torch.allclose(keys.reshape(1, 12, 32), video, atol=1e-6)


def test_edit_through_the_command_and_the_automatic_mask(models, tmp_path, capsys):
    import imageio.v3 as iio

    res = DreamMotionPipeline.from_pretrained(models["1.5"])(_clip(17), SRC, TGT, steps=2, seed=0, lr=0.05, mask=None)
    assert res.report["video"]["working_shape"] == [1, 4, 5, 4, 4] and res.frames.shape == (17, SIZE, SIZE, 3)
    clip = tmp_path / "clip.gif"
    iio.imwrite(clip, _clip(9), extension=".gif", duration=125, loop=0)
    out = tmp_path / "edit.mp4"
    code = edit_main([str(clip), "--model", models["1.0"], "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "2",
                      "--guidance-scale", "6", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    am = report["auto_mask"]
    assert report["steps_run"] == 2 and report["model"]["prediction_type"] == "v_prediction"
    assert am["words"] == {"source": ["red"], "target": ["blue"]} and am["layers"][0] == "transformer_blocks.0.attn1"
    capsys.readouterr()
    clip13 = tmp_path / "clip13.gif"
    iio.imwrite(clip13, _clip(13), extension=".gif", duration=125, loop=0)
    assert edit_main([str(clip13), "--model", models["1.5"], "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "1",
                      "--out", str(tmp_path / "e2.mp4")]) == 2
    assert "pass --frames 9" in capsys.readouterr().err


def test_a_scheduler_without_v_prediction_is_refused(models, tmp_path):
    import shutil

    folder = tmp_path / "eps"
    shutil.copytree(models["1.0"], folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "epsilon"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FastDMError, match="predicts v"):
        load_backbone(str(folder))


def test_a_v_prediction_edit_resumes_bit_identically(models, tmp_path):
    pipe = DreamMotionPipeline.from_pretrained(models["1.5"])
    clip = _clip(17)
    kw = dict(steps=3, seed=5, lr=0.05, mask=None)
    full = pipe(clip, SRC, TGT, **kw)
    ckpt = tmp_path / "ckpt"
    pipe(clip, SRC, TGT, checkpoint_dir=str(ckpt), checkpoint_every=1,
         callback_on_step_end=lambda p, step, t, tensors: {"stop": True} if step == 2 else None, **kw)
    resumed = pipe(clip, SRC, TGT, checkpoint_dir=str(ckpt), resume=True, **kw)
    assert resumed.report["resumed_from_step"] == 2 and torch.equal(resumed.working, full.working)
