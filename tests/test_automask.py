"""The automatic mask (`--mask auto`): word difference, token positions, the estimate on a tiny
random model and on the bundled shapes model, the fallbacks, and the CLI outputs."""

import json

import numpy as np
import pytest
import torch

from fastdm.automask import AutoMask, changed_words, estimate_mask, otsu_threshold
from fastdm.backbone.base import word_token_positions
from fastdm.cli import main
from fastdm.io.tensors import frames_to_tensor

PROMPTS = ["--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right"]


@pytest.mark.parametrize(
    "source, target, expected",
    [
        ("a red circle moving right", "a blue circle moving right", ([1], [1])),  # changed
        ("a red circle moving right", "a blue triangle moving right", ([1, 2], [1, 2])),  # two changed
        ("a circle moving right", "a red circle moving right", ([], [1])),  # added
        ("a big red circle", "a red circle", ([1], [])),  # removed
        ("A Red circle, moving", "a red circle moving", ([], [])),  # case and punctuation only
        ("a red circle", "a red circle", ([], [])),  # same
        ("a cat on a mat", "a dog on a rug", ([1, 4], [1, 4])),  # two separate changes
    ],
)
def test_changed_words(source, target, expected):
    assert changed_words(source, target) == expected


def test_word_token_positions_with_the_clip_tokenizer():
    from transformers import CLIPTokenizer

    from fastdm.backbone import default_model_path

    tok = CLIPTokenizer.from_pretrained(f"{default_model_path()}/tokenizer")
    # a start token at 0, one token per known word
    assert word_token_positions(tok, "a red circle moving right", 77) == [[0 + 1], [2], [3], [4], [5]]
    # a word outside the vocabulary splits into several tokens, and the later words shift
    pos = word_token_positions(tok, "a zebra circle", 77)
    assert pos[0] == [1] and len(pos[1]) > 1 and pos[2] == [pos[1][-1] + 1]
    ids = tok("a zebra circle").input_ids
    assert ids[pos[2][0]] == tok("circle", add_special_tokens=False).input_ids[0]
    # positions past the encoder's length are dropped
    assert word_token_positions(tok, "a red circle moving right", 3) == [[1], [2], [], [], []]


class _NoStartTokenizer:
    """T5-like: no start token, an end token after the words; one token per character."""

    all_special_ids = [1]

    def __call__(self, text, add_special_tokens=True, truncation=False):
        class R:
            input_ids = [ord(c) for c in text.replace(" ", "")] + [1]

        return R()


def test_word_token_positions_without_a_start_token():
    assert word_token_positions(_NoStartTokenizer(), "ab c def", 512) == [[0, 1], [2], [3, 4, 5]]


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(0.2, 0.05, 5000), rng.normal(0.8, 0.05, 1000)]), 0, 1)
    assert 0.35 < otsu_threshold(values) < 0.65


def test_tiny_random_model_mask_has_the_video_shape(tiny_model, clip):
    from fastdm import DreamMotionPipeline

    pipe = DreamMotionPipeline.from_pretrained(tiny_model)
    bb = pipe.backbone
    assert bb.cross_attention_layers()  # the UNet's spatial attn2 layers
    x = bb.to_working(frames_to_tensor(clip))
    src, tgt = "a red circle moving right", "a blue circle moving right"
    am = estimate_mask(bb, x, pipe.encode_prompts([src, tgt]), src, tgt, (16, 16), max_foreground=1.0)
    assert am.fallback is None and am.mask.shape == clip.shape[:3] and am.heat.shape == clip.shape[:3]
    assert set(np.unique(am.mask)) <= {0.0, 1.0} and 0 < am.mask.mean() <= 1
    assert am.words == {"source": ["red"], "target": ["blue"]} and am.tokens == {"source": [2], "target": [2]}
    assert am.denoiser_calls == 1 and am.report()["batch"] == 2
    # through the pipeline: the report says how the mask was made, the result holds it
    res = pipe(clip, src, tgt, mask="auto", steps=1)
    assert "auto_mask" in res.report and res.report["timings"]["auto_mask_s"] >= 0
    assert (res.mask is None) == (res.report["auto_mask"]["fallback"] is not None) == (not res.report["video"]["masked"])
    with pytest.raises(Exception, match="auto"):
        pipe(clip, src, tgt, mask="boxes", steps=1)


def test_same_prompts_fall_back_without_model_calls(tiny_model, clip):
    from fastdm import DreamMotionPipeline

    pipe = DreamMotionPipeline.from_pretrained(tiny_model)
    x = pipe.backbone.to_working(frames_to_tensor(clip))
    p = "a red circle moving right"
    am = estimate_mask(pipe.backbone, x, pipe.encode_prompts([p, p]), p, "A red circle, moving right.", (16, 16))
    assert am.mask is None and am.denoiser_calls == 0 and "differ in no word" in am.fallback


@pytest.fixture(scope="module")
def shapes_pipe():
    from fastdm import DreamMotionPipeline

    return DreamMotionPipeline.from_pretrained()


# Measured on every suite clip with the bundled model (benchmarks/results/automask-iou-*.md):
# IoU with the object 0.18-0.54 (mean 0.39), object coverage >= 0.99. These two clips measured
# 0.54 and 0.48; the test asks for 0.3 and 95 % coverage.
@pytest.mark.parametrize("case_id", ["shape-00", "colour-05"])
def test_shapes_model_mask_overlaps_the_object(shapes_pipe, case_id):
    from fastdm.toyworld.suite import build_suite, render_case
    from fastdm.toyworld.metrics import object_mask

    case = next(c for c in build_suite() if c["id"] == case_id)
    clip = render_case(case)
    bb = shapes_pipe.backbone
    am = estimate_mask(bb, bb.to_working(frames_to_tensor(clip)),
                       shapes_pipe.encode_prompts([case["source_prompt"], case["target_prompt"]]),
                       case["source_prompt"], case["target_prompt"], (32, 32))
    assert am.fallback is None, am.fallback
    obj = np.stack([object_mask(f) for f in clip])
    m = am.mask > 0.5
    iou = (m & obj).sum() / (m | obj).sum()
    assert iou > 0.3, iou
    assert (m & obj).sum() / obj.sum() > 0.95


def test_shapes_model_featureless_clip_falls_back(shapes_pipe):
    # black clips measured 0.38-0.43 of the frame above Otsu's threshold (suite clips 0.13-0.28)
    clip = np.zeros((8, 32, 32, 3), np.uint8)
    src, tgt = "a red circle moving right", "a blue circle moving right"
    bb = shapes_pipe.backbone
    am = estimate_mask(bb, bb.to_working(frames_to_tensor(clip)), shapes_pipe.encode_prompts([src, tgt]), src, tgt, (32, 32))
    assert am.mask is None and "no distinct region" in am.fallback and am.foreground > 0.30


def test_cli_mask_auto_writes_mask_video_and_three_panel_compare(tiny_model, clip_file, tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "out" / "edit.mp4"
    out.parent.mkdir()
    code = main([str(clip_file), *PROMPTS, "--model", tiny_model, "--out", str(out), "--steps", "1", "--size", "16x16",
                 "--mask", "auto"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "auto mask" in captured.out
    assert sorted(p.name for p in out.parent.iterdir()) == ["edit.json", "edit.mp4", "edit_compare.mp4", "edit_mask.mp4"]
    mask = iio.imread(out.with_name("edit_mask.mp4"), plugin="FFMPEG")
    compare = iio.imread(out.with_name("edit_compare.mp4"), plugin="FFMPEG")
    assert mask.shape == (4, 16, 16, 3) and compare.shape == (4, 16, 48, 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["input"]["mask"] == "auto" and set(report["auto_mask"]) >= {"words", "tokens", "fallback", "seconds"}
    assert str(out.with_name("edit_mask.mp4")) in report["outputs"]


def test_cli_mask_none_is_no_mask(tiny_model, clip_file, tmp_path, capsys):
    out = tmp_path / "edit.mp4"
    code = main([str(clip_file), *PROMPTS, "--model", tiny_model, "--out", str(out), "--steps", "1", "--size", "16x16",
                 "--mask", "none", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["video"]["masked"] is False and "auto_mask" not in report
    assert not out.with_name("edit_mask.mp4").exists()


def test_wan_backbone_mask_over_latent_frames(tmp_path):
    """The transformer's cross-attention (attn2 after its q/k norms, T5 tokens without a start
    token) gives a mask at the video's frame count, though its maps are per latent frame."""
    from fastdm import DreamMotionPipeline
    from fastdm.toyworld.world import render_clip
    from fastdm.testing import build_tiny_wan_model

    folder = build_tiny_wan_model(tmp_path / "wan", native_size=(48, 32))
    pipe = DreamMotionPipeline.from_pretrained(str(folder))
    bb = pipe.backbone
    clip = np.ascontiguousarray(render_clip("red", "circle", "right", size=48, frames=5, radius=8, speed=3)[:, 8:40])
    layers = bb.cross_attention_layers()
    assert list(layers) == [f"blocks.{i}.attn2" for i in range(len(layers))]
    src, tgt = "a red circle moving right", "a blue circle moving right"
    pos = bb.word_token_positions(src)
    assert len(pos) == 5 and all(pos) and pos[0][0] == 0  # no start token: the first word starts at 0
    x = bb.to_working(frames_to_tensor(clip))
    assert x.shape[2] < clip.shape[0]  # latent frames
    am = estimate_mask(bb, x, pipe.encode_prompts([src, tgt]), src, tgt, (48, 32), num_frames=5, max_foreground=1.0)
    assert am.fallback is None and am.mask.shape == (5, 32, 48)
    res = pipe(clip, src, tgt, mask="auto", steps=1)
    assert res.report["auto_mask"]["denoiser_calls"] == 1 and res.frames.shape == clip.shape


def test_cross_attention_maps_leave_out_the_padding_the_model_masks():
    """Where the model masks padded text rows (LTX-Video, HunyuanVideo), the maps' softmax runs over the real rows
    only: the same maps as a text without the padding. Unmasked, the padding takes a share and the maps differ."""
    from fastdm.automask import _CrossAttentionMaps
    from fastdm.backbone.base import CrossAttention

    class Frames:  # UNet3D's layout: (B*F, N, C) queries, text keys repeated per frame
        def keys_to_frames(self, k, f):
            return k.reshape(-1, f, *k.shape[1:])

    q_mod, k_mod = torch.nn.Identity(), torch.nn.Identity()
    ca = CrossAttention(q_mod, k_mod, 2, 0.5)
    gen = torch.Generator().manual_seed(0)
    b, f, n, length, c, real = 2, 3, 5, 7, 8, 4
    q = torch.randn(b * f, n, c, generator=gen)
    k = torch.randn(b * f, length, c, generator=gen)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :real] = True

    def maps(keys, key_mask):
        cap = _CrossAttentionMaps(Frames(), {"a": ca}, [[1], [0, 2]], f, key_mask)
        with cap:
            q_mod(q)
            k_mod(keys)
        return cap.maps["a"]

    want = maps(k[:, :real], None)
    assert torch.allclose(maps(k, mask), want, atol=1e-6)
    assert not torch.allclose(maps(k, None), want, atol=1e-3)


def test_text_key_masks_are_the_ones_the_models_are_given():
    """LTX-Video: the non-zero rows; HunyuanVideo: the non-zero Llama rows (the last row is the pooled CLIP vector);
    the first row always (as their denoiser_forward builds the mask); UNet3D: none (it attends to every row)."""
    from fastdm.backbone.base import Backbone
    from fastdm.backbone.hunyuan import HunyuanVideoBackbone
    from fastdm.backbone.ltx import LTXBackbone

    text = torch.zeros(2, 6, 4)
    text[0, :3] = 1.0
    text[1, 1:2] = 1.0
    text[:, 5] = 2.0  # (Hunyuan: the pooled row)
    ltx = LTXBackbone.text_key_mask(None, text)
    assert ltx.tolist() == [[True, True, True, False, False, True], [True, True, False, False, False, True]]
    hy = HunyuanVideoBackbone.text_key_mask(None, text)
    assert hy.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    assert Backbone.text_key_mask(None, text) is None


def test_graded_mask_is_the_map_over_its_threshold_inside_the_mask_only():
    """EditConfig.soft_mask: min(1, heat / threshold) ** power inside the mask, 0 outside; power 0 is the mask."""
    from fastdm.automask import graded_mask

    rng = np.random.default_rng()
    heat = rng.random((3, 8, 8)).astype(np.float32)
    heat[0, 0, 0], heat[0, 0, 1] = 0.0, 1.0  # (the map's extremes)
    thr = 0.4
    mask = (heat > 0.2).astype(np.float32)  # (a dilated mask reaches below the threshold)
    am = AutoMask(mask=mask, heat=heat, threshold=thr)
    for power in (0.5, 1.0, 2.0):
        ref = np.where(mask > 0, np.minimum(1.0, heat.astype(np.float64) / thr) ** power, 0.0)
        got = graded_mask(am, power)
        assert got.dtype == np.float32 and got.shape == heat.shape
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
        assert (got[heat > thr] == 1).all() and (got[mask == 0] == 0).all()
    assert graded_mask(am, 0.0) is mask
    assert graded_mask(AutoMask(mask=None, heat=None, fallback="no region"), 1.0) is None


def test_soft_mask_grades_the_update_and_leaves_the_outside_alone(shapes_pipe):
    """The graded mask is what the step applies: cells the map weights less move less than with the binary mask;
    nothing outside the mask moves; the report says the mask was graded; a user mask stays binary."""
    from fastdm.toyworld.suite import build_suite, render_case

    case = next(c for c in build_suite() if c["id"] == "colour-05")
    clip = render_case(case)
    kw = dict(mask="auto", steps=2, seed=0, lr=3.2, t_schedule="anneal", lr_schedule="cosine")
    binary = shapes_pipe.prepare(clip, case["source_prompt"], case["target_prompt"], soft_mask=0.0, **kw)  # (the folder's is 1)
    soft = shapes_pipe.prepare(clip, case["source_prompt"], case["target_prompt"], soft_mask=1.0, **kw)
    mb, ms = binary.mask, soft.mask
    assert ((ms > 0) == (mb > 0)).all() and (ms <= mb).all() and ((ms > 0) & (ms < 1)).any() and (ms == 1).any()
    for run in (binary, soft):
        while not run.done:
            run.step()
    moved_b = (binary.x.detach() - binary.x_src).abs()
    moved_s = (soft.x.detach() - soft.x_src).abs()
    assert (moved_s[(ms == 0).expand_as(moved_s)] == 0).all()
    ring = ((ms > 0) & (ms < 0.5)).expand_as(moved_s)
    assert moved_s[ring].sum() < moved_b[ring].sum()
    assert soft.finish().report["auto_mask"]["graded"] == 1.0
    user = shapes_pipe.prepare(clip, case["source_prompt"], case["target_prompt"], soft_mask=1.0,
                               **{**kw, "mask": np.ones(clip.shape[:3], np.float32)})
    assert set(user.mask.unique().tolist()) == {1.0}
