"""The optimizer driver on tiny models built from configs and loaded through the real loader."""

import numpy as np
import pytest
import torch

from fastdm import EditConfig, Editor, FastDMError

FAST = dict(steps=3, seed=1)


def cfg(**kw):
    base = dict(source_prompt="a red circle moving right", target_prompt="a blue circle moving right")
    base.update(FAST)
    base.update(kw)
    return EditConfig(**base)


def test_edit_changes_video_and_reports(editor, clip):
    res = editor.edit(clip, cfg())
    assert res.frames.shape == clip.shape and res.frames.dtype == np.uint8
    assert not np.array_equal(res.frames, clip)
    r = res.report
    assert r["steps_run"] == 3 and set(r["final_losses"]) == {"vdds", "s_ssm", "t_ssm"}
    assert r["tap_layers"] and all(n.startswith("up_blocks.") and n.endswith("attn1") for n in r["tap_layers"])
    assert r["peak_memory_bytes"] > 0 and r["timings"]["step_mean_s"] > 0


def test_model_parameters_stay_frozen(editor, clip):
    editor.edit(clip, cfg(steps=1))
    unet = editor.backbone.unet
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())


def test_same_prompts_without_ssm_leave_video_unchanged(editor, clip):
    c = cfg(target_prompt="a red circle moving right", s_ssm_weight=0, t_ssm_weight=0, steps=4)
    res = editor.edit(clip, c)
    assert np.array_equal(res.frames, clip)


def test_mask_confines_vdds(editor, clip):
    mask = np.zeros(clip.shape[:3], np.float32)
    mask[:, 4:12, 2:10] = 1
    res = editor.edit(clip, cfg(s_ssm_weight=0, t_ssm_weight=0, steps=4), mask=mask)
    outside = mask == 0
    assert np.array_equal(res.frames[outside], clip[outside])
    assert not np.array_equal(res.frames[~outside], clip[~outside])


def test_mask_confines_the_whole_update_by_default(editor, clip):
    """mask_scope "all": S-SSM/T-SSM on as well, still nothing outside the mask changes;
    "vdds" (the mask limits V-DDS only) lets the structure/motion gradient reach the background."""
    mask = np.zeros(clip.shape[:3], np.float32)
    mask[:, 4:12, 2:10] = 1
    outside = mask == 0
    res = editor.edit(clip, cfg(steps=4, lr=4.0), mask=mask)
    assert np.array_equal(res.frames[outside], clip[outside])
    assert not np.array_equal(res.frames[~outside], clip[~outside])
    loose = editor.edit(clip, cfg(steps=4, lr=4.0, mask_scope="vdds"), mask=mask)
    assert not np.array_equal(loose.frames[outside], clip[outside])


def test_unknown_mask_scope_is_refused(editor, clip):
    with pytest.raises(FastDMError, match="`mask_scope=everything` is unknown"):
        editor.edit(clip, cfg(mask_scope="everything"))


def test_same_seed_is_bit_identical_and_other_seed_differs(editor, clip):
    a = editor.edit(clip, cfg()).frames
    b = editor.edit(clip, cfg()).frames
    c = editor.edit(clip, cfg(seed=2)).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_kill_equals_uninterrupted_run(tiny_model, clip, tmp_path, optimizer):
    c = cfg(steps=5, optimizer=optimizer, lr=0.4 if optimizer == "sgd" else 0.05)
    want = Editor.from_pretrained(tiny_model).edit(clip, c).frames

    def kill_at_3(info):
        if info.step == 3:  # after the step-2 checkpoint, before the step-4 one
            raise Killed

    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        Editor.from_pretrained(tiny_model).edit(clip, c, callback=kill_at_3, checkpoint_dir=str(ck), checkpoint_every=2)
    assert (ck / "state.pt").is_file()
    res = Editor.from_pretrained(tiny_model).edit(clip, c, checkpoint_dir=str(ck), resume=True)
    assert res.report["resumed_from_step"] == 2 and res.report["steps_run"] == 3
    assert np.array_equal(res.frames, want)


def test_resume_refuses_other_config_or_input(editor, clip, tmp_path):
    ck = str(tmp_path / "ck")
    editor.edit(clip, cfg(steps=2), checkpoint_dir=ck, checkpoint_every=1)
    with pytest.raises(FastDMError, match="different configuration"):
        editor.edit(clip, cfg(steps=3, seed=9), checkpoint_dir=ck, resume=True)
    with pytest.raises(FastDMError, match="different input"):
        editor.edit(clip[:, :, ::-1].copy(), cfg(steps=3), checkpoint_dir=ck, resume=True)


def test_latent_model_edit(tiny_latent_model, clip):
    ed = Editor.from_pretrained(tiny_latent_model)
    assert ed.backbone.info.space == "latent"
    res = ed.edit(clip, cfg(steps=2))
    assert res.frames.shape == clip.shape
    assert res.report["video"]["working_shape"] == [1, 4, 4, 8, 8]


def test_callback_sees_every_step(editor, clip):
    seen = []
    editor.edit(clip, cfg(steps=3), callback=lambda s: seen.append((s.step, s.total_steps, sorted(s.losses))))
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 3 for s in seen)


def test_bad_frames_and_config(editor, clip):
    with pytest.raises(FastDMError, match="multiple of"):
        editor.edit(clip[:, :15], cfg())
    with pytest.raises(FastDMError, match="empty"):
        editor.edit(clip, cfg(target_prompt="  "))
    with pytest.raises(FastDMError, match="mask"):
        editor.edit(clip, cfg(), mask=np.ones((3, 16, 16), np.float32))
    with pytest.raises(FastDMError, match="no spatial self-attention layer"):
        editor.edit(clip, cfg(tap_layers=("nothing.*",)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_weights_keep_fp32_video(tiny_model, clip, dtype):
    ed = Editor.from_pretrained(tiny_model, dtype=dtype)
    assert next(ed.backbone.unet.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    res = ed.edit(clip, cfg(steps=1))
    assert res.frames.shape == clip.shape and all(np.isfinite(v) for v in res.report["final_losses"].values())
