"""tools/train_shapes_dit.py: a smoke run, exact resume (safetensors + JSON, no pickle), and the
exported folder edits through the normal loader (a pixel-space Wan model)."""

import json

import numpy as np
import pytest

from .train_tools import load_tool, resumed_equals_uninterrupted, run_tool

SMALL = ("--size", "16")


@pytest.fixture(scope="module")
def tool():
    return load_tool("train_shapes_dit")


def test_resumed_training_equals_uninterrupted_and_exports_a_wan_folder(tool, tmp_path):
    split, meta2 = resumed_equals_uninterrupted(tool, tmp_path, *SMALL)
    assert meta2["args"]["model"] == "shapes-dit"

    from fastdm import DreamMotionPipeline
    from fastdm.toyworld.world import render_clip

    model = split / "model"
    assert json.loads((model / "model_index.json").read_text())["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert not (model / "vae").exists() and json.loads((model / "fastdm.json").read_text())["trained_steps"] == 4
    pipe = DreamMotionPipeline.from_pretrained(str(model))
    assert pipe.backbone.info.space == "pixel" and pipe.backbone.info.native_size == (16, 16)
    clip = render_clip("red", "circle", "right", size=16, frames=4, radius=4, speed=2)
    res = pipe(clip, "a red circle moving right", "a blue circle moving right", steps=1, seed=0)
    assert res.frames.shape == clip.shape and all(np.isfinite(v) for v in res.report["final_losses"].values())


def test_refuses_a_state_of_another_model(tool, tmp_path):
    run_tool(tool, tmp_path, 1, *SMALL, "--no-export")
    meta = json.loads((tmp_path / "state.json").read_text())
    meta["args"]["model"] = "shapes"
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="not a shapes-dit state"):
        run_tool(tool, tmp_path, 2, *SMALL, "--no-export")
