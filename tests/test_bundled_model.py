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
