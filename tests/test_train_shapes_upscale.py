"""tools/train_shapes_upscale.py: the training pairs, a smoke run, exact resume (safetensors + JSON,
no pickle), and the exported folder runs as the cascade's upscale stage."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_shapes_upscale", ROOT / "tools" / "train_shapes_upscale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tool, folder: Path, steps: int, *extra):
    tool.main(["--steps", str(steps), "--batch", "2", "--frames", "2", "--size", "32", "--channels", "8,16", "--threads", "1",
               "--warmup", "2", "--state", str(folder / "state.json"), "--log", str(folder / "loss.csv"),
               "--export", str(folder / "model"), *extra])


def _state(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / "state.json").read_text())
    return meta, load_file(str(folder / meta["tensors"]))


def test_pairs_show_one_object_at_both_sizes(tool):
    low, high, prompt = tool.pair(np.random.default_rng(3), 64, 4)
    assert low.shape == (4, 32, 32, 3) and high.shape == (4, 64, 64, 3) and prompt.startswith("a ")
    for f in range(4):  # the same object at the same place: centroids agree to within a low-res pixel
        cl = np.argwhere(low[f].sum(-1) > 0).mean(0) * 2 + 0.5
        ch = np.argwhere(high[f].sum(-1) > 0).mean(0)
        assert np.abs(cl - ch).max() < 2.0, (f, cl, ch)


def test_resumed_training_equals_uninterrupted_and_exports_an_upscale_stage(tool, tmp_path):
    split, whole = tmp_path / "split", tmp_path / "whole"
    _run(tool, split, 2, "--no-export", "--crop", "16")
    meta2, _ = _state(split)
    assert meta2["step"] == 2 and meta2["args"]["model"] == "shapes-upscale"
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt") for p in split.rglob("*"))
    _run(tool, split, 4, "--crop", "16")  # resumes at step 2
    _run(tool, whole, 4, "--crop", "16")
    (ma, ta), (mb, tb) = _state(split), _state(whole)
    assert ma["step"] == mb["step"] == 4 and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:5]
    assert ma["np_rng"] == mb["np_rng"] and ma["pending_losses"] == mb["pending_losses"]

    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.cascade.spec import SETTINGS
    from fastdm.cascade.stages import run_upscale
    from fastdm.shapes import render_clip

    model = split / "model"
    assert json.loads((model / "fastdm.json").read_text())["trained_steps"] == 4
    info = check_stage_folder(str(model), "upscale", "t")
    stage = load_stage_model(info, "t", device=torch.device("cpu"), dtype=torch.float32)
    clip = render_clip("red", "circle", "right", size=8, frames=3, radius=2, speed=1)
    out = run_upscale(stage, clip, "a red circle moving right", dict(SETTINGS["upscale"], steps=2, window=2, stride=1))
    assert out.shape == (3, 16, 16, 3)


def test_refuses_a_state_of_another_model_or_shape(tool, tmp_path):
    _run(tool, tmp_path, 1, "--no-export")
    with pytest.raises(SystemExit, match="--crop 16 differs"):
        _run(tool, tmp_path, 2, "--no-export", "--crop", "16")
    meta = json.loads((tmp_path / "state.json").read_text())
    meta["args"]["model"] = "shapes"
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="not a shapes-upscale state"):
        _run(tool, tmp_path, 2, "--no-export")
