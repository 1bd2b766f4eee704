"""Wan 2.2 backbones: T2V-A14B (two experts split by noise level) and TI2V-5B (48-channel VAE, 16x in space).

Tiny random-weight pipelines of the real classes saved by diffusers' own ``WanPipeline.save_pretrained``
(``fastdm.testing.build_tiny_wan22_model``) and loaded through fastdm's loader, offline, on the CPU.
"""

import json

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline, FastDMError
from fastdm.backbone import load_backbone
from fastdm.cli import main as edit_main
from fastdm.taps import KeyTaps

FRAMES = 5  # 2 latent frames
SRC, TGT = "a red circle moving right", "a blue circle moving right"


@pytest.fixture(scope="module")
def a14b_model(tmp_path_factory):
    from fastdm.testing import build_tiny_wan22_model

    return str(build_tiny_wan22_model(tmp_path_factory.mktemp("a14b") / "model", "a14b", native_size=(32, 32)))


@pytest.fixture(scope="module")
def ti2v_model(tmp_path_factory):
    from fastdm.testing import build_tiny_wan22_model

    return str(build_tiny_wan22_model(tmp_path_factory.mktemp("ti2v") / "model", "ti2v", native_size=(64, 64)))


@pytest.fixture(scope="module")
def a14b(a14b_model):
    return load_backbone(a14b_model)


def _clip(size: int):
    from fastdm.toyworld.world import render_clip

    return np.ascontiguousarray(render_clip("red", "circle", "right", size=size, frames=FRAMES, radius=size // 4, speed=2))


def _boundary(bb) -> int:
    """The smallest integer timestep the high-noise expert serves."""
    return next(t for t in range(bb.num_train_timesteps) if bb.sigma(t) >= bb.boundary_ratio)


def test_a14b_folder_loads_two_experts(a14b, a14b_model):
    index = json.loads(open(f"{a14b_model}/model_index.json").read())
    assert index["_class_name"] == "WanPipeline" and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert a14b.experts == 2 and a14b.boundary_ratio == 0.875 and a14b.shift == 3.0
    assert set(a14b.modules()) == {"transformer", "transformer_2", "vae"}
    assert not a14b.offload_experts  # (on the CPU both stay where they are; on CUDA the inactive one waits in host memory)
    tb = _boundary(a14b)
    assert a14b.sigma(tb) >= 0.875 > a14b.sigma(tb - 1)
    # the pipeline feeds the transformer s(t) * 1000 and compares that with boundary_ratio * 1000
    assert a14b.expert_for(tb) is a14b.transformer and a14b.expert_for(tb - 1) is a14b.transformer_2
    assert a14b.expert_for(999) is a14b.transformer and a14b.expert_for(0) is a14b.transformer_2


def test_each_timestep_goes_through_its_expert(a14b):
    tb = _boundary(a14b)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 4)
    text = a14b.encode_prompts([SRC, TGT])

    def direct(expert, t):
        s = a14b.sigma(t) * a14b.num_train_timesteps
        return expert(x, torch.full((2,), s), encoder_hidden_states=text, return_dict=False)[0]

    with torch.no_grad():
        hi, lo = a14b.denoiser_forward(x, torch.full((2,), tb), text), a14b.denoiser_forward(x, torch.full((2,), tb - 1), text)
        assert torch.allclose(hi, direct(a14b.transformer, tb), atol=1e-5)
        assert torch.allclose(lo, direct(a14b.transformer_2, tb - 1), atol=1e-5)
        assert not torch.allclose(direct(a14b.transformer, tb - 1), lo)  # (the experts differ)
        mixed = a14b.denoiser_forward(x, torch.tensor([tb, tb - 1]), text)  # a batch across the boundary: split
    assert torch.allclose(mixed[0], hi[0], atol=1e-5) and torch.allclose(mixed[1], lo[1], atol=1e-5)


def test_one_step_evaluates_source_and_edit_on_one_expert(a14b_model):
    """A step at high noise and one at low noise: every denoiser call of a step (edited and source video,
    both prompts, the grad branch) goes through that step's expert."""
    pipe = DreamMotionPipeline.from_pretrained(a14b_model)
    bb = pipe.backbone
    calls = {"high": 0, "low": 0}
    hooks = [bb.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__("high", calls["high"] + 1)),
             bb.transformer_2.register_forward_pre_hook(lambda *_: calls.__setitem__("low", calls["low"] + 1))]
    seen = []
    try:
        for t_min, t_max in ((900, 950), (50, 100)):
            run = pipe.prepare(_clip(32), SRC, TGT, mask=None, steps=1, seed=0, lr=0.05, t_min=t_min, t_max=t_max)
            before = dict(calls)
            run.step()
            seen.append((run.last_t, {k: calls[k] - before[k] for k in calls}))
            run.finish()
    finally:
        for h in hooks:
            h.remove()
    (t1, c1), (t2, c2) = seen
    assert bb.expert_for(t1) is bb.transformer and c1["high"] >= 2 and c1["low"] == 0, seen
    assert bb.expert_for(t2) is bb.transformer_2 and c2["low"] >= 2 and c2["high"] == 0, seen


def test_keys_come_from_the_active_expert_before_rope(a14b):
    """The captured keys equal ``norm_k(to_k(h))`` recomputed by hand from the running expert's attention
    weights and its input h (video tokens only: Wan's self-attention has no text), not the other expert's."""
    tb = _boundary(a14b)
    torch.manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4)
    text = a14b.encode_prompts([SRC])
    for t, expert, other in ((tb, a14b.transformer, a14b.transformer_2), (tb - 1, a14b.transformer_2, a14b.transformer)):
        seen = {}
        attn = expert.blocks[1].attn1
        h = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.__setitem__("h", args[0] if args else kwargs["hidden_states"]),
                                           with_kwargs=True)
        try:
            with KeyTaps(a14b, ["blocks.1.attn1"]) as taps, torch.no_grad():
                a14b.predict_noise(x, t, text)
                keys = taps.take(FRAMES)["blocks.1.attn1"]
        finally:
            h.remove()
        with torch.no_grad():
            mine = attn.norm_k(attn.to_k(seen["h"]))
            theirs = other.blocks[1].attn1.norm_k(other.blocks[1].attn1.to_k(seen["h"]))
        assert keys.shape == (1, 2, 4, 24)  # (batch, latent frames, tokens per frame, channels)
        assert torch.allclose(keys.reshape(1, 8, 24), mine, atol=1e-6)
        assert not torch.allclose(keys.reshape(1, 8, 24), theirs, atol=1e-3)


def test_the_low_noise_expert_takes_guidance_scale_2(a14b, ti2v_model):
    tb = _boundary(a14b)
    assert a14b.guidance_at(tb, 7.5, 3.0) == 7.5 and a14b.guidance_at(tb - 1, 7.5, 3.0) == 3.0
    assert a14b.guidance_at(tb - 1, 7.5, None) == 7.5
    assert load_backbone(ti2v_model).guidance_at(10, 5.0, 3.0) == 5.0  # one expert: one scale


def test_a14b_edits_and_resumes_bit_identically(a14b_model, tmp_path):
    pipe = DreamMotionPipeline.from_pretrained(a14b_model)
    clip = _clip(32)
    kw = dict(steps=4, seed=2, lr=0.05, mask=None, guidance_scale_2=4.0)
    ts = []
    full = pipe(clip, SRC, TGT, callback_on_step_end=lambda p, step, t, tensors: ts.append(t), **kw)
    experts = [pipe.backbone.expert_for(t) is pipe.backbone.transformer for t in ts]
    assert experts[0] and not all(experts), ts  # the edit crosses the boundary (high noise first)
    ckpt = tmp_path / "ckpt"
    part = pipe(clip, SRC, TGT, checkpoint_dir=str(ckpt), checkpoint_every=1,
                callback_on_step_end=lambda p, step, t, tensors: {"stop": True} if step == 2 else None, **kw)
    assert part.report["steps_run"] == 2
    resumed = pipe(clip, SRC, TGT, checkpoint_dir=str(ckpt), resume=True, **kw)
    assert resumed.report["resumed_from_step"] == 2 and torch.equal(resumed.working, full.working)
    with pytest.raises(FastDMError, match="two-expert"):
        pipe(clip, SRC, TGT, steps=1, backend="compile")


def test_ti2v_5b_edits_on_its_48_channel_vae(ti2v_model):
    bb = load_backbone(ti2v_model)
    assert bb.experts == 1 and bb.shift == 5.0
    assert (bb.info.spatial_factor, bb.info.size_multiple, bb.info.native_size) == (16, 32, (64, 64))
    assert bb.working_shape(FRAMES, (64, 64)) == (1, 48, 2, 4, 4)
    assert "4k+1" in bb.frame_count_problem(6)
    res = DreamMotionPipeline.from_pretrained(ti2v_model)(_clip(64), SRC, TGT, steps=2, seed=0, lr=0.05, mask=None)
    assert res.report["video"]["working_shape"] == [1, 48, 2, 4, 4] and res.frames.shape == (FRAMES, 64, 64, 3)
    assert all(np.isfinite(v) for v in res.report["final_losses"].values())


@pytest.mark.parametrize("variant,size", [("a14b", 32), ("ti2v", 64)])
def test_fastdm_edit_runs_on_a_folder_saved_by_diffusers(variant, size, a14b_model, ti2v_model, tmp_path, capsys):
    import imageio.v3 as iio

    clip = tmp_path / "clip.gif"
    iio.imwrite(clip, _clip(size), extension=".gif", duration=125, loop=0)
    out = tmp_path / "edit.mp4"
    model = a14b_model if variant == "a14b" else ti2v_model
    code = edit_main([str(clip), "--model", model, "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "2",
                      "--mask", "none", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps_run"] == 2 and report["model"]["class"] == "WanTransformer3DModel"


def test_folders_fastdm_cannot_run_are_refused_with_the_reason(a14b_model, tmp_path, capsys):
    import shutil

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from fastdm.backbone.wan import _check_experts, _check_vae
    from fastdm.errors import Unsupported

    broken = tmp_path / "no-boundary"
    shutil.copytree(a14b_model, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["boundary_ratio"] = None
    (broken / "model_index.json").write_text(json.dumps(index))
    code = edit_main([str(tmp_path / "x.gif"), "--model", str(broken), "--source-prompt", SRC, "--target-prompt", TGT])
    assert code == 2
    with pytest.raises(Unsupported, match="no boundary_ratio"):
        load_backbone(str(broken))
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, text_dim=16, freq_dim=256, ffn_dim=32,
              num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    i2v = WanTransformer3DModel(in_channels=36, out_channels=16, **kw)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    with pytest.raises(Unsupported, match="image-to-video"):
        _check_vae(i2v, vae)
    with pytest.raises(Unsupported, match="differ in num_layers"):
        _check_experts(WanTransformer3DModel(in_channels=16, out_channels=16, **kw),
                       WanTransformer3DModel(in_channels=16, out_channels=16, **{**kw, "num_layers": 3}), 0.875)


def test_the_automatic_mask_reads_the_cross_attention_of_the_expert_that_runs(a14b_model):
    pipe = DreamMotionPipeline.from_pretrained(a14b_model)
    res = pipe(_clip(32), SRC, TGT, mask="auto", steps=1, seed=0, lr=0.05)
    am = res.report["auto_mask"]
    assert am["denoiser_calls"] == 1 and am["layers"] == ["blocks.0.attn2", "blocks.1.attn2"]
    assert am["words"] == {"source": ["red"], "target": ["blue"]}
    assert am["fallback"] is None or "distinct region" in am["fallback"]  # (random weights: a map, maybe flat)
