"""Wan 2.1 backbone (WanTransformer3DModel + AutoencoderKLWan + UMT5, flow matching) on CPU.

Tiny configs of the real classes (2 layers, 2 heads of 12 channels, patch (1, 2, 2), a tiny
AutoencoderKLWan, a 2-layer UMT5 and a local T5 tokenizer), saved with save_pretrained and
loaded through the normal loader, offline.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline, FastDMError
from fastdm.backbone import load_backbone
from fastdm.driver.plan import FAST, LEAN, NAIVE

FRAMES, H, W = 5, 32, 48  # 2 latent frames of 4 x 6 cells: 2 x 3 = 6 tokens per latent frame


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    from fastdm.testing import build_tiny_wan_model

    return str(build_tiny_wan_model(tmp_path_factory.mktemp("tiny_wan"), native_size=(W, H)))


@pytest.fixture(scope="module")
def wan(wan_model):
    return load_backbone(wan_model)


@pytest.fixture
def wan_clip():
    from fastdm.toyworld.world import render_clip

    return np.ascontiguousarray(render_clip("red", "circle", "right", size=W, frames=FRAMES, radius=8, speed=3)[:, 8:40])


def test_wan_folder_loads_through_the_loader(wan, wan_model):
    info = wan.info
    assert type(wan).__name__ == "WanBackbone" and info.name == "WanTransformer3DModel"
    assert (info.space, info.prediction_type, info.spatial_factor, info.size_multiple) == ("latent", "flow", 8, 16)
    assert info.native_size == (W, H) and wan.shift == 3.0
    frames = torch.rand(FRAMES, 3, H, W) * 2 - 1
    x = wan.to_working(frames)
    assert x.shape == wan.working_shape(FRAMES, (W, H)) == (1, 16, 2, 4, 6)
    assert wan.from_working(x).shape == (FRAMES, 3, H, W)
    # the text encoder lives on the CPU, embeddings are zero past each prompt's tokens
    assert next(wan.text_encoder.parameters()).device.type == "cpu"
    e = wan.encode_prompts(["a red circle moving right", ""])
    n_tok = len(wan.tokenizer("a red circle moving right").input_ids)
    assert e.shape == (2, *wan.text_embedding_shape()) == (2, 16, 16)
    assert e[0, :n_tok].abs().sum(-1).min() > 0 and e[0, n_tok:].abs().sum() == 0 and e[1, 1:].abs().sum() == 0
    wan.release_text_encoder()
    assert "text_encoder" not in wan.modules()
    # bf16: the modules Wan keeps in fp32 stay fp32, the rest is bf16
    b16 = load_backbone(wan_model, dtype="bf16")
    tr = b16.transformer
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and tr.scale_shift_table.dtype == torch.float32
    assert tr.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert next(b16.text_encoder.parameters()).dtype == torch.bfloat16


def test_timestep_to_noise_level_matches_the_scheduler(wan, wan_model):
    """t -> s is the scheduler's own shifted schedule, and the transformer is fed what the diffusers
    sampler feeds it at that noise level."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler.from_pretrained(wan_model, subfolder="scheduler")
    sched.set_timesteps(999)  # sigmas at u = 1, 0.999, ..., 0.002: on the integer timesteps
    for i in (1, 50, 500, 900, 949):
        t = 1000 - i
        assert wan.sigma(t) == pytest.approx(float(sched.sigmas[i]), rel=1e-5)
        a, b = wan.noise_coefficients(t)
        assert (a, b) == pytest.approx((1 - float(sched.sigmas[i]), float(sched.sigmas[i])), abs=1e-6)  # fp32 sigmas
    seen = []
    hook = wan.transformer.condition_embedder.timesteps_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        wan.predict_noise(torch.zeros(1, 16, 2, 4, 6), 500, torch.zeros(1, 16, 16))
    finally:
        hook.remove()
    assert seen[0].item() == pytest.approx(1000 * 3 * 0.5 / (1 + 2 * 0.5), rel=1e-6)  # s(500) = 0.75 -> 750
    assert (wan.sigma(50), wan.sigma(950)) == pytest.approx((0.13636, 0.98276), abs=1e-4)


def test_keys_per_latent_frame_frame_major_before_rope(wan):
    """Keys of block 0 (before any attention mixes tokens): one row per latent frame, tokens in
    row-major order, and equal content in two frames gives equal keys (no rotary position in them)."""
    from fastdm.taps import KeyTaps

    text = torch.zeros(1, 16, 16)
    x = torch.randn(1, 16, 1, 4, 6).repeat(1, 1, 2, 1, 1)  # frame 1 == frame 0
    with KeyTaps(wan, ["blocks.0.attn1"]) as taps, torch.no_grad():
        wan.predict_noise(x, 400, text)
        k = taps.take(FRAMES)["blocks.0.attn1"]
    assert k.shape == (1, 2, 6, 24)
    assert torch.allclose(k[:, 0], k[:, 1], atol=1e-6)
    y = x.clone()
    y[:, :, 1, 0:2, 2:4] += 1.0  # latent frame 1, token (row 0, column 1)
    with KeyTaps(wan, ["blocks.0.attn1"]) as taps, torch.no_grad():
        wan.predict_noise(y, 400, text)
        k2 = taps.take(FRAMES)["blocks.0.attn1"]
    changed = (k2 - k).abs().amax(-1) > 1e-6
    want = torch.zeros_like(changed)
    want[0, 1, 1] = True
    assert torch.equal(changed, want)
    # after the rotary embedding equal content would not give equal keys: the capture point matters
    assert wan.key_module("blocks.0.attn1") is wan.transformer.blocks[0].attn1.norm_k


def test_one_edit_step_through_the_pipeline(wan_model, wan_clip):
    pipe = DreamMotionPipeline.from_pretrained(wan_model)
    mask = np.zeros(wan_clip.shape[:3], np.float32)
    mask[1:, :, 24:] = 1  # only frames 1..4, right half: latent frame 0 stays fixed
    res = pipe(wan_clip, "a red circle moving right", "a blue circle moving right", mask=mask, steps=1, seed=0, lr=0.05)
    assert res.frames.shape == wan_clip.shape and res.frames.dtype == np.uint8
    assert res.report["model"]["class"] == "WanTransformer3DModel" and res.report["model"]["prediction_type"] == "flow"
    assert res.report["video"]["working_shape"] == [1, 16, 2, 4, 6]
    assert res.report["tap_layers"] == ["blocks.1.attn1"]
    assert all(np.isfinite(v) for v in res.report["final_losses"].values())
    x0 = pipe.backbone.to_working(torch.from_numpy(wan_clip).permute(0, 3, 1, 2).float() / 127.5 - 1)
    d = (res.working - x0).abs()
    assert d[:, :, 1, :, 3:].amax() > 0  # the masked latent cells moved
    assert d[:, :, 0].amax() == 0 and d[:, :, :, :, :3].amax() == 0  # nothing outside the mask did


def _edit(pipe, clip, plan):
    return pipe(clip, "a red circle moving right", "a blue circle moving right", steps=2, seed=3, lr=0.05, plan=plan)


@pytest.mark.parametrize("plan", [FAST, LEAN], ids=["fast", "lean"])
def test_plan_matches_naive(wan_model, wan_clip, plan):
    pipe = DreamMotionPipeline.from_pretrained(wan_model)
    base, got = _edit(pipe, wan_clip, NAIVE), _edit(pipe, wan_clip, plan)
    x0 = pipe.backbone.to_working(torch.from_numpy(wan_clip).permute(0, 3, 1, 2).float() / 127.5 - 1)
    step_base, step_got = base.working - x0, got.working - x0
    assert step_base.abs().max() > 0
    assert ((step_got - step_base).norm() / step_base.norm()).item() < 1e-4
    for k in ("s_ssm", "t_ssm", "vdds"):
        assert got.report["final_losses"][k] == pytest.approx(base.report["final_losses"][k], rel=1e-3, abs=1e-10)


def test_flow_vdds_with_an_exact_denoiser_reaches_the_known_edit(wan):
    """Toy with a known answer: each prompt's data is one point (source: the source video x^;
    target: x^ + delta), so the exact velocity is v = (x_t - mu) / s. V-DDS on the converted noise
    predictions gives g = scale (1 - s)/s ((x - x^) - delta) at every s, and the edit converges to
    x^ + delta. The raw velocity difference would not: at the right answer it is -delta/s != 0."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 16, 2, 4, 6)
    delta = torch.randn(shape, generator=gen)
    L, D = wan.text_embedding_shape()
    emb = {"tgt": torch.full((L, D), 1.0), "neg": torch.zeros(L, D), "src": torch.full((L, D), 2.0)}
    pipe = DreamMotionPipeline(wan)
    pipe.encode_prompts = lambda prompts: torch.stack([emb[p] for p in prompts])
    clip = (np.random.default_rng(0).random((FRAMES, H, W, 3)) * 255).astype(np.uint8)
    x_src = wan.to_working(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1)
    mus = {1.0: x_src + delta, 2.0: x_src, 0.0: x_src}  # unconditional: unused at guidance 1

    def exact_velocity(sample, timestep, text):
        s = torch.tensor([3 * u / (1 + 2 * u) for u in (timestep.double() / 1000).tolist()]).view(-1, 1, 1, 1, 1)
        mu = torch.cat([mus[float(e[0, 0])] for e in text])
        return ((sample.double() - mu) / s).float()

    wan.denoiser_forward = exact_velocity  # the instance's forward only; the class is untouched
    try:
        seen = []

        def check(_pipe, step, t, tensors):
            if step == 1:  # the first update, from x = x^: exactly scale (1 - s)/s (-delta)
                s = wan.sigma(t)
                want = 2000.0 / (4 * 6) * (1 - s) / s * (-delta)
                assert torch.allclose(tensors["grad"], want, rtol=1e-4, atol=1e-5)
            seen.append(t)

        # the paper's schedule (t ~ U[50, 950], constant lr): the V-DDS fixed point under uniform draws
        res = pipe(clip, "src", "tgt", preset="paper", steps=300, lr=2e-3, guidance_scale=1.0, s_ssm_weight=0.0,
                   t_ssm_weight=0.0, negative_prompt="neg", seed=0, callback_on_step_end=check,
                   callback_on_step_end_tensor_inputs=("grad",))
    finally:
        del wan.denoiser_forward
    err = (res.working - (x_src + delta)).norm() / delta.norm()
    assert err < 1e-3, err
    assert min(seen) >= 50 and max(seen) <= 950
    s = wan.sigma(500)  # the raw velocity difference at the right answer, same noise: -delta / s
    v_gap = ((1 - s) * delta - delta) / s
    assert v_gap.norm() > 0.5 * delta.norm()


def test_mask_pools_frames_into_latent_frames(wan):
    m = torch.zeros(9, 1, 2, 2)
    m[0, 0, 0, 0] = 1
    m[6, 0, 1, 1] = 1  # frame 6 lies in latent frame 2 (frames 5..8)
    out = wan.mask_frames_to_working(m)
    assert out.shape == (3, 1, 2, 2)
    assert out[0, 0, 0, 0] == 1 and out[2, 0, 1, 1] == 1 and out.sum() == 2


def test_bad_inputs_and_folders(wan_model, wan_clip, tmp_path, monkeypatch):
    pipe = DreamMotionPipeline.from_pretrained(wan_model)
    with pytest.raises(FastDMError, match=r"4k\+1 frames .* pass `frames=5`"):
        pipe(wan_clip[:4].repeat(2, 0)[:8], "a", "b", steps=1)
    # a folder without transformer/ and without unet/
    bad = tmp_path / "no_transformer"
    shutil.copytree(wan_model, bad)
    shutil.rmtree(bad / "transformer")
    with pytest.raises(FastDMError, match=r"lacks unet/.*transformer/ in place of unet/"):
        load_backbone(str(bad))
    bad = tmp_path / "no_text"
    shutil.copytree(wan_model, bad)
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(FastDMError, match=r"lacks text_encoder/; it must hold transformer, text_encoder"):
        load_backbone(str(bad))
    bad = tmp_path / "pickle"
    shutil.copytree(wan_model, bad)
    (bad / "transformer" / "diffusion_pytorch_model.safetensors").rename(bad / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(FastDMError, match="only pickle weights"):
        load_backbone(str(bad))
    bad = tmp_path / "ddim"
    shutil.copytree(wan_model, bad)
    cfg = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    cfg.update(use_flow_sigmas=False, prediction_type="epsilon")
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FastDMError, match="not configured for flow matching"):
        load_backbone(str(bad))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(FastDMError, match="pip install accelerate"):
        load_backbone(wan_model)


def test_pixel_space_wan_model(tmp_path, clip):
    """Without vae/ the transformer works on pixels (the shapes-dit layout): any frame count."""
    from fastdm.testing import build_tiny_wan_model

    folder = build_tiny_wan_model(tmp_path / "px", latent=False, native_size=(16, 16))
    pipe = DreamMotionPipeline.from_pretrained(str(folder))
    bb = pipe.backbone
    assert (bb.info.space, bb.info.spatial_factor, bb.info.size_multiple, bb.valid_range) == ("pixel", 1, 2, (-1.0, 1.0))
    res = pipe(clip, "a red circle moving right", "a blue circle moving right", steps=1, seed=0)
    assert res.frames.shape == clip.shape and res.report["video"]["working_shape"] == [1, 3, 4, 16, 16]
