"""tools/train_shapes_upscale.py: the training pairs, a smoke run, exact resume (safetensors + JSON,
no pickle), and the exported folder runs as the cascade's upscale stage."""

import json

import numpy as np
import pytest
import torch

from .train_tools import load_tool, resumed_equals_uninterrupted, run_tool

SMALL = ("--size", "32", "--channels", "8,16")


@pytest.fixture(scope="module")
def tool():
    return load_tool("train_shapes_upscale")


def test_pairs_show_one_object_at_both_sizes(tool):
    low, high, prompt = tool.pair(np.random.default_rng(3), 64, 4)
    assert low.shape == (4, 32, 32, 3) and high.shape == (4, 64, 64, 3) and prompt.startswith("a ")
    for f in range(4):  # the same object at the same place: centroids agree to within a low-res pixel
        cl = np.argwhere(low[f].sum(-1) > 0).mean(0) * 2 + 0.5
        ch = np.argwhere(high[f].sum(-1) > 0).mean(0)
        assert np.abs(cl - ch).max() < 2.0, (f, cl, ch)


def test_resumed_training_equals_uninterrupted_and_exports_an_upscale_stage(tool, tmp_path):
    split, meta2 = resumed_equals_uninterrupted(tool, tmp_path, *SMALL, "--crop", "16")
    assert meta2["args"]["model"] == "shapes-upscale"

    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.cascade.spec import SETTINGS
    from fastdm.cascade.stages import run_upscale
    from fastdm.toyworld.world import render_clip

    model = split / "model"
    assert json.loads((model / "fastdm.json").read_text())["trained_steps"] == 4
    info = check_stage_folder(str(model), "upscale", "t")
    stage = load_stage_model(info, "t", device=torch.device("cpu"), dtype=torch.float32)
    clip = render_clip("red", "circle", "right", size=8, frames=3, radius=2, speed=1)
    out = run_upscale(stage, clip, "a red circle moving right", dict(SETTINGS["upscale"], steps=2, window=2, stride=1))
    assert out.shape == (3, 16, 16, 3)


def test_refuses_a_state_of_another_model_or_shape(tool, tmp_path):
    run_tool(tool, tmp_path, 1, *SMALL, "--no-export")
    with pytest.raises(SystemExit, match="--crop 16 differs"):
        run_tool(tool, tmp_path, 2, *SMALL, "--no-export", "--crop", "16")
    meta = json.loads((tmp_path / "state.json").read_text())
    meta["args"]["model"] = "shapes"
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="not a shapes-upscale state"):
        run_tool(tool, tmp_path, 2, *SMALL, "--no-export")
