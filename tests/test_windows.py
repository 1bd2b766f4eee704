"""Long clips: windows of the model's own length on one shared tensor (driver/windows.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline
from fastdm.driver.windows import coverage, window_starts, window_stride

SRC, TGT = "a red circle moving right", "a blue circle moving right"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return DreamMotionPipeline.from_pretrained(tiny_model)


def _clip(frames: int) -> np.ndarray:
    from fastdm.toyworld.world import render_clip

    return render_clip("red", "circle", "right", size=16, frames=frames, radius=4, speed=0.5)


@pytest.mark.parametrize("frames,n", [(32, 8), (33, 8), (9, 8), (64, 8), (17, 5), (12, 4), (21, 21)])
@pytest.mark.parametrize("overlap", [0.5, 0.0, 0.75])
def test_every_step_covers_every_frame_and_weights_them_alike(frames, n, overlap):
    stride = window_stride(n, overlap)
    seen_starts = set()
    for phase in range(stride):
        starts = window_starts(frames, n, phase, stride)
        assert starts[0] == 0 and starts[-1] == max(0, frames - n) and all(0 <= s <= max(0, frames - n) for s in starts)
        c = coverage(frames, n, starts)
        assert (c >= 1).all()  # every frame in some window
        weights = torch.zeros(frames)
        for s in starts:
            weights[s:s + n] += 1 / c[s:s + n]
        assert torch.allclose(weights, torch.ones(frames))  # one update per frame per step, wherever it is
        seen_starts.update(starts)
    if frames - n + 1 > len(window_starts(frames, n, 0, stride)) and stride > 1:  # the seams move between steps
        assert len(seen_starts) > len(window_starts(frames, n, 0, stride))


def test_a_clip_of_window_length_runs_as_before(pipe):
    clip = _clip(4)
    a = pipe(clip, SRC, TGT, steps=2)
    b = pipe(clip, SRC, TGT, steps=2, window=4)
    assert a.report["windows"] is None and b.report["windows"] is None
    assert torch.equal(a.working, b.working)


def test_the_model_never_sees_more_than_a_window(pipe):
    clip = _clip(12)
    seen = []
    bb = pipe.backbone
    orig = type(bb).predict_noise

    def spy(self, x_t, *a, **k):
        seen.append(x_t.shape[2])
        return orig(self, x_t, *a, **k)

    bb.predict_noise = spy.__get__(bb)
    try:
        res = pipe(clip, SRC, TGT, steps=3, window=4, mask="auto")
    finally:
        del bb.predict_noise
    w = res.report["windows"]
    assert set(seen) == {4}  # the automatic mask too reads the clip window by window
    assert w["window"] == 4 and w["working_frames"] == 12 and w["updates_per_frame"] == 3
    assert w["windows_run"] == 3 * w["windows_per_step"] and w["windows_per_step"] >= 12 / 4
    ev = res.report["evaluations"]
    assert ev["forward"] - ev["setup_forward"] == 4 * w["windows_run"] and ev["backward"] == w["windows_run"]
    am = res.report["auto_mask"]
    assert am["denoiser_calls"] == len(am["timesteps"]) * 3 and ev["setup_forward"] == 2 * am["denoiser_calls"]
    assert res.frames.shape == clip.shape and (res.mask is None or res.mask.shape == clip.shape[:3])
    from fastdm.io.tensors import frames_to_tensor

    src = pipe.backbone.to_working(frames_to_tensor(clip))
    for s in (0, 4, 8):  # every part of the clip was edited
        assert not torch.equal(res.working[:, :, s:s + 4], src[:, :, s:s + 4])


def test_windowed_edit_resumes_bit_identically(pipe, tmp_path):
    clip = _clip(10)
    whole = pipe(clip, SRC, TGT, steps=4, window=4, seed=3)
    ckpt = str(tmp_path / "ckpt")
    pipe(clip, SRC, TGT, steps=4, window=4, seed=3, checkpoint_dir=ckpt, checkpoint_every=2,
         callback_on_step_end=lambda p, step, t, x: {"stop": step == 2})
    resumed = pipe(clip, SRC, TGT, steps=4, window=4, seed=3, checkpoint_dir=ckpt, resume=True)
    assert resumed.report["resumed_from_step"] == 2
    assert torch.equal(resumed.working, whole.working)


def test_the_tiny_wan_model_edits_a_clip_longer_than_its_window(tmp_path):
    from fastdm.toyworld.world import render_clip
    from fastdm.testing import build_tiny_wan_model

    folder = build_tiny_wan_model(tmp_path / "wan", native_size=(48, 32))
    wan = DreamMotionPipeline.from_pretrained(str(folder))
    clip = np.ascontiguousarray(render_clip("red", "circle", "right", size=48, frames=13, radius=8, speed=2)[:, 8:40])
    res = wan(clip, SRC, TGT, steps=2, window=2, mask="auto")  # 13 frames: 4 latent frames, windows of 2
    w = res.report["windows"]
    assert w["working_frames"] == 4 and w["window"] == 2 and w["windows_per_step"] >= 2
    assert res.frames.shape == clip.shape and res.mask is None or res.mask.shape == clip.shape[:3]


def test_the_default_window_is_the_models_own_length(pipe, tiny_model):
    from fastdm.backbone import load_backbone

    assert load_backbone("shapes").native_frames() == 8  # its fastdm.json: trained on 8-frame clips
    assert load_backbone(tiny_model).native_frames() == 24  # a UNet3D folder without one: ZeroScope's 24
    clip = _clip(26)
    run = pipe.prepare(clip, SRC, TGT, steps=1)
    assert run.window == 24
