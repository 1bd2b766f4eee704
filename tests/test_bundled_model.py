"""The trained shapes model ships in the package, loads offline through the normal loader, edits."""

from pathlib import Path

import numpy as np

from fastdm import EditConfig, Editor, read_video
from fastdm.backbone import default_model_path, load_backbone

ASSETS = Path(default_model_path()).parents[1]


def test_bundled_model_is_complete_and_small():
    root = Path(default_model_path())
    for part in ("model_index.json", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (root / part).exists(), part
    assert not list(root.rglob("*.bin")), "weights must be safetensors"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size


def test_bundled_model_loads_and_edits_a_bundled_clip():
    bb = load_backbone(default_model_path())
    assert bb.info.space == "pixel" and bb.info.native_size == (32, 32)
    assert len(bb.default_tap_layers()) >= 1
    frames, fps = read_video(ASSETS / "clips" / "red_circle_right.gif")
    assert frames.shape == (8, 32, 32, 3) and fps > 0
    res = Editor(bb).edit(frames, EditConfig("a red circle moving right", "a blue circle moving right", steps=3))
    assert res.frames.shape == frames.shape and not np.array_equal(res.frames, frames)
    assert all(np.isfinite(v) for v in res.report["final_losses"].values())


def _complete_and_small(root: Path, parts, limit_mib: int):
    for part in ("model_index.json", *parts):
        assert (root / part).exists(), part
    assert not list(root.rglob("*.bin")), "weights must be safetensors"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= limit_mib * 2**20, size


def test_shapes_dit_ships_and_edits_by_name(tmp_path):
    from fastdm.backbone import bundled_model_path
    from fastdm.backbone.wan import WanBackbone
    from fastdm.cli import main
    from fastdm.io import read_frames

    root = Path(bundled_model_path("shapes-dit"))
    _complete_and_small(root, ("transformer", "text_encoder", "tokenizer", "scheduler"), 20)
    bb = load_backbone("shapes-dit")
    assert isinstance(bb, WanBackbone) and bb.info.space == "pixel" and bb.info.native_size == (32, 32)
    out = tmp_path / "dit.mp4"
    assert main([str(ASSETS / "clips" / "red_circle_right.gif"), "--model", "shapes-dit", "--mask", "none",
                 "--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right",
                 "--steps", "3", "--out", str(out), "--quiet"]) == 0
    frames = read_frames(out)[0]
    assert frames.shape == (8, 32, 32, 3)


def test_shapes_upscale_ships_and_the_shapes_cascade_runs_on_it(tmp_path):
    import json

    from fastdm.cascade import load_cascade
    from fastdm.cli import main
    from fastdm.io import read_frames

    up = load_cascade("shapes").stages[1]
    _complete_and_small(Path(up.model), ("unet", "text_encoder", "tokenizer", "scheduler"), 20)
    # the built-in cascade's own folders, with fewer sampling steps
    data = {"stages": [{"kind": "edit", "model": default_model_path(), "frames": 8, "size": [32, 32]},
                       {**{k: v for k, v in up.settings.items() if v is not None}, "kind": "upscale", "model": up.model,
                        "steps": 3}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    out = tmp_path / "up.mp4"
    assert main([str(ASSETS / "clips" / "red_circle_right.gif"), "--cascade", str(tmp_path / "c.json"), "--mask", "none",
                 "--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right",
                 "--steps", "3", "--out", str(out), "--quiet"]) == 0
    assert read_frames(out)[0].shape == (8, 64, 64, 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["kind"] for s in report["cascade"]["stages"]] == ["edit", "upscale"]


def test_shapes_upscale_restores_a_known_clip():
    """The shipped upscale stage, with the shipped settings and fewer steps, on a clip whose 64x64
    render is known: the colour is kept in every frame and the result is close to the truth. (Before
    the chain started from the noised upsampled clip, this model's output was noise: 7 dB.)"""
    import torch

    from fastdm.toyworld.metrics import video_summary
    from benchmarks.upscale_settings import psnr
    from fastdm.cascade import load_cascade, run_upscale
    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.toyworld.world import render_clip

    up = load_cascade("shapes").stages[1]
    model = load_stage_model(check_stage_folder(up.model, "upscale", "t"), "t", device=torch.device("cpu"), dtype=torch.float32)
    lo = render_clip("magenta", "triangle", "left", size=32, frames=8, radius=5, speed=1.5)
    hi = render_clip("magenta", "triangle", "left", size=64, frames=8, radius=10, speed=3)
    out = run_upscale(model, lo, "a magenta triangle moving left", {**up.settings, "steps": 10})
    assert out.shape == (8, 64, 64, 3)
    assert all(c == "magenta" for c in video_summary(out)["colours"])
    assert psnr(out, hi) > 20.0
