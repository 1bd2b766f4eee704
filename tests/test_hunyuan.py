"""HunyuanVideo backbone (HunyuanVideoTransformer3DModel: dual- and single-stream joint attention, flow matching,
guidance-distilled).

Tiny random-weight pipelines of the real classes saved by diffusers' own ``HunyuanVideoPipeline.save_pretrained``
(``fastdm.testing.build_tiny_hunyuan_model``: Llama + CLIP text encoders with local tokenizers), loaded through
fastdm's loader, offline, on the CPU; checked against the pipeline's own prompt encoding and transformer call.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline
from fastdm.backbone import load_backbone
from fastdm.cli import main as edit_main
from fastdm.errors import FastDMError, Unsupported
from fastdm.taps import KeyTaps

SIZE = 32  # 4 x 4 latent cells, 2 x 2 tokens a latent frame (patch 2)
SRC, TGT = "a red circle moving right", "a blue circle moving right"
FRAMES = 9  # 3 latent frames


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fastdm.testing import build_tiny_hunyuan_model

    root = tmp_path_factory.mktemp("hunyuan")
    return {"distilled": str(build_tiny_hunyuan_model(root / "distilled", native_size=(SIZE, SIZE), frames=FRAMES)),
            "cfg": str(build_tiny_hunyuan_model(root / "cfg", guidance_embeds=False, native_size=(SIZE, SIZE), frames=FRAMES))}


def _clip(frames: int = FRAMES):
    from fastdm.toyworld.world import render_clip

    return np.ascontiguousarray(render_clip("red", "circle", "right", size=SIZE, frames=frames, radius=8, speed=2))


def _pipeline(folder):
    from diffusers import HunyuanVideoPipeline

    return HunyuanVideoPipeline.from_pretrained(folder)


def _template(folder):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    meta = json.loads(open(f"{folder}/fastdm.json").read())
    return {**DEFAULT_PROMPT_TEMPLATE, "crop_start": meta["crop_start"]}, meta["max_sequence_length"]


def test_folder_saved_by_hunyuanvideopipeline_loads(models):
    folder = models["distilled"]
    assert json.loads(open(f"{folder}/model_index.json").read())["_class_name"] == "HunyuanVideoPipeline"
    bb = load_backbone(folder)
    assert type(bb).__name__ == "HunyuanVideoBackbone" and bb.info.prediction_type == "flow" and bb.guidance_distilled
    assert (bb.info.spatial_factor, bb.info.size_multiple, bb.shift) == (8, 16, 7.0)
    x = bb.to_working(torch.rand(FRAMES, 3, SIZE, SIZE) * 2 - 1)
    assert x.shape == bb.working_shape(FRAMES, (SIZE, SIZE)) == (1, 4, 3, 4, 4)
    assert bb.from_working(x).shape == (FRAMES, 3, SIZE, SIZE)
    assert "pass `frames=9`" in bb.frame_count_problem(11) and bb.frame_count_problem(13) is None
    layers = list(bb.spatial_self_attention_layers())
    assert layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert bb.default_tap_layers() == ["single_transformer_blocks.0.attn"]
    assert bb.engine_problem() and load_backbone(models["cfg"]).engine_problem() is None


def test_prompts_are_encoded_as_the_pipeline_encodes_them(models):
    folder = models["distilled"]
    pipe, bb = _pipeline(folder), load_backbone(folder)
    template, length = _template(folder)
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(prompt=[SRC, ""], prompt_template=template, max_sequence_length=length)
    got = bb.encode_prompts([SRC, ""])
    assert got.shape == (2, length + 1, 16) and bb.text_embedding_shape() == (length + 1, 16)
    keep = mask.bool()
    assert keep[0].sum() > keep[1].sum() >= 1  # (the prompt has more tokens than the empty one)
    assert torch.allclose(got[:, :length][keep], embeds[keep], atol=1e-6)
    assert torch.all(got[:, :length][~keep] == 0)  # padding rows zeroed: they carry the mask
    assert torch.allclose(got[:, length, :8], pooled, atol=1e-6) and torch.all(got[:, length, 8:] == 0)
    words = bb.word_token_positions(SRC)
    ids = bb.tokenizer(template["template"].format(SRC)).input_ids[template["crop_start"]:]
    assert bb.tokenizer.convert_ids_to_tokens([ids[p] for p in words[1]]) == ["\u2581red"]
    bb.settings = {**bb.settings, "crop_start": template["crop_start"] - 2}  # a crop that keeps 2 template tokens
    words = bb.word_token_positions(SRC)
    ids = bb.tokenizer(template["template"].format(SRC)).input_ids[template["crop_start"] - 2:]
    assert words[1] == [3] and bb.tokenizer.convert_ids_to_tokens([ids[p] for p in words[1]]) == ["\u2581red"]


@pytest.mark.parametrize("kind", ["distilled", "cfg"])
def test_velocity_equals_the_pipelines_own_transformer_call(models, kind):
    """The pipeline's call at sigma s: timestep s * 1000, its prompt embeddings and mask, the pooled CLIP
    vector and (distilled) guidance = 6 * 1000; fastdm's integer t maps to s on the shift-7 schedule."""
    folder = models[kind]
    pipe, bb = _pipeline(folder), load_backbone(folder)
    template, length = _template(folder)
    torch.manual_seed(1)
    x = torch.randn(1, 4, 3, 4, 4)
    t = 700
    s = 7.0 * (t / 1000) / (1 + 6.0 * (t / 1000))
    assert bb.noise_coefficients(t) == pytest.approx((1 - s, s))
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(prompt=SRC, prompt_template=template, max_sequence_length=length)
        guidance = torch.tensor([6000.0]) if kind == "distilled" else None
        want = pipe.transformer(hidden_states=x, timestep=torch.tensor([s * 1000]), encoder_hidden_states=embeds,
                                encoder_attention_mask=mask, pooled_projections=pooled, guidance=guidance, return_dict=False)[0]
        bb.embedded_guidance = 6.0
        got = bb.denoiser_forward(x, torch.tensor([t]), bb.encode_prompts([SRC]))
        assert torch.allclose(got, want, atol=1e-5)
        if kind == "distilled":  # the guidance is an input: another scale, another prediction
            bb.embedded_guidance = 1.0
            assert not torch.allclose(bb.denoiser_forward(x, torch.tensor([t]), bb.encode_prompts([SRC])), want, atol=1e-4)


def test_keys_are_the_video_tokens_of_both_kinds_of_block_before_rope(models):
    """Dual-stream: ``norm_k(to_k(video))`` (text has its own projection); single-stream: ``norm_k(to_k([video;
    text]))`` cut to the video tokens; both recomputed by hand from the attention's weights and inputs."""
    bb = load_backbone(models["distilled"])
    dual, single = bb.transformer.transformer_blocks[0].attn, bb.transformer.single_transformer_blocks[0].attn
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda _m, args, kwargs, n=n: seen.__setitem__(n, kwargs), with_kwargs=True)
             for n, a in (("dual", dual), ("single", single))]
    names = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    torch.manual_seed(2)
    x = torch.randn(1, 4, 3, 4, 4)
    try:
        with KeyTaps(bb, names) as taps, torch.no_grad():
            bb.predict_noise(x, 400, bb.encode_prompts([SRC]))
            keys = taps.take(FRAMES)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        d = dual.norm_k(dual.to_k(seen["dual"]["hidden_states"]).unflatten(2, (dual.heads, -1))).flatten(2)
        joint = torch.cat([seen["single"]["hidden_states"], seen["single"]["encoder_hidden_states"]], 1)
        s = single.norm_k(single.to_k(joint).unflatten(2, (single.heads, -1))).flatten(2)[:, :12]
    assert seen["single"]["encoder_hidden_states"].shape[1] == bb.text_length()
    for name, want in zip(names, (d, s)):
        assert keys[name].shape == (1, 3, 4, 20)  # (batch, latent frames, tokens per frame, heads x head dim)
        assert torch.allclose(keys[name].reshape(1, 12, 20), want, atol=1e-6)


def test_a_distilled_step_is_two_guided_passes(models):
    """No unconditional branch: the V-DDS gradient is the difference of the edited video's prediction under the
    target prompt and the source's under the source prompt, both at the embedded guidance, from two evaluations;
    the model without guidance embedding keeps classifier-free guidance's four."""
    from fastdm.losses import vdds_gradient

    pipe = DreamMotionPipeline.from_pretrained(models["distilled"])
    run = pipe.prepare(_clip(), SRC, TGT, mask=None, steps=1, seed=0, lr=0.05, guidance_scale=4.0, s_ssm_weight=0.0,
                       t_ssm_weight=0.0)
    bb, step = pipe.backbone, run.stepper
    torch.manual_seed(3)
    x = torch.nn.Parameter(run.x_src + 0.3 * torch.randn_like(run.x_src))
    noise, t = torch.randn_like(run.x_src), 600
    calls = []
    hook = bb.transformer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs["guidance"].clone()),
                                                    with_kwargs=True)
    before = step.evaluations["forward"]
    try:
        step(x, run.x_src, t, noise)
    finally:
        hook.remove()
    a, b = bb.noise_coefficients(t)
    with torch.no_grad():
        bb.embedded_guidance = 4.0
        e_tgt = bb.predict_noise(a * x.detach() + b * noise, t, run.text[0:1])
        e_src = bb.predict_noise(a * run.x_src + b * noise, t, run.text[2:3])
    want = vdds_gradient(e_tgt, e_src, float(bb.alphas_cumprod[t]), run.vcfg)
    assert torch.allclose(x.grad, want, rtol=1e-4, atol=1e-4)  # (batched vs one at a time: float32 rounding x 125)
    assert sum(c.numel() for c in calls) == 2 and all(torch.all(c == 4000.0) for c in calls)
    assert step.evaluations["forward"] - before == 2
    run.finish()
    cfg = DreamMotionPipeline.from_pretrained(models["cfg"])
    res = cfg(_clip(), SRC, TGT, mask=None, steps=1, seed=0, lr=0.05)
    assert res.report["evaluations"]["forward"] == 4


def test_edit_through_the_command_and_the_automatic_mask(models, tmp_path, capsys):
    import imageio.v3 as iio

    res = DreamMotionPipeline.from_pretrained(models["distilled"])(_clip(), SRC, TGT, steps=2, seed=0, lr=0.05, mask=None)
    assert res.report["video"]["working_shape"] == [1, 4, 3, 4, 4] and res.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert res.report["evaluations"]["forward"] == 4 and res.report["evaluations"]["backward"] == 2
    clip = tmp_path / "clip.gif"
    iio.imwrite(clip, _clip(), extension=".gif", duration=125, loop=0)
    out = tmp_path / "edit.mp4"
    code = edit_main([str(clip), "--model", models["distilled"], "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "2",
                      "--guidance-scale", "6", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    am = report["auto_mask"]
    assert report["steps_run"] == 2 and report["model"]["prediction_type"] == "flow"
    assert am["words"] == {"source": ["red"], "target": ["blue"]} and am["layers"][0] == "transformer_blocks.0.attn"
    capsys.readouterr()
    clip11 = tmp_path / "clip11.gif"
    iio.imwrite(clip11, _clip(11), extension=".gif", duration=125, loop=0)
    assert edit_main([str(clip11), "--model", models["distilled"], "--source-prompt", SRC, "--target-prompt", TGT,
                      "--steps", "1", "--out", str(tmp_path / "e2.mp4")]) == 2
    assert "pass --frames 9" in capsys.readouterr().err


def test_a_distilled_edit_resumes_bit_identically(models, tmp_path):
    pipe = DreamMotionPipeline.from_pretrained(models["distilled"])
    clip = _clip()
    kw = dict(steps=3, seed=5, lr=0.05, mask=None)
    full = pipe(clip, SRC, TGT, **kw)
    ckpt = tmp_path / "ckpt"
    pipe(clip, SRC, TGT, checkpoint_dir=str(ckpt), checkpoint_every=1,
         callback_on_step_end=lambda p, step, t, tensors: {"stop": True} if step == 2 else None, **kw)
    resumed = pipe(clip, SRC, TGT, checkpoint_dir=str(ckpt), resume=True, **kw)
    assert resumed.report["resumed_from_step"] == 2 and torch.equal(resumed.working, full.working)


def test_folders_fastdm_cannot_run_are_refused_with_the_reason(models, tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel

    from fastdm.backbone.components import from_components

    broken = tmp_path / "no-clip"
    shutil.copytree(models["distilled"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = index["tokenizer_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(Unsupported, match="text_encoder_2/ and tokenizer_2/"):
        load_backbone(str(broken))
    bb = load_backbone(models["distilled"])
    i2v = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                                         num_single_layers=1, num_refiner_layers=1, patch_size=2, text_embed_dim=16,
                                         pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type="token_replace")
    with pytest.raises(Unsupported, match="image-to-video"):
        from_components(transformer=i2v, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, scheduler=_pipeline(models["distilled"]).scheduler,
                        vae=bb.vae, text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2, path="x")
    bad = tmp_path / "bad-crop"
    shutil.copytree(models["distilled"], bad)
    (bad / "fastdm.json").write_text(json.dumps({"crop_start": -1}))
    with pytest.raises(FastDMError, match="crop_start must be a whole number"):
        load_backbone(str(bad)).encode_prompts([SRC])


def test_the_automatic_mask_runs_at_the_edits_guidance(models):
    """The mask's model call takes this edit's guidance input, not what an earlier call left on the backbone."""
    pipe = DreamMotionPipeline.from_pretrained(models["distilled"])
    seen = []
    hook = pipe.backbone.transformer.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw["guidance"].clone()),
                                                               with_kwargs=True)
    pipe.backbone.embedded_guidance = 99.0
    try:
        run = pipe.prepare(_clip(), SRC, TGT, mask="auto", steps=1, seed=0, lr=0.05, guidance_scale=4.0)
    finally:
        hook.remove()
    assert run.auto_mask is not None and seen and all(torch.all(g == 4000.0) for g in seen)
