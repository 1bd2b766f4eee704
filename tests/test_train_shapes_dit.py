"""tools/train_shapes_dit.py: a smoke run, exact resume (safetensors + JSON, no pickle), and the
exported folder edits through the normal loader (a pixel-space Wan model)."""

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
    spec = importlib.util.spec_from_file_location("train_shapes_dit", ROOT / "tools" / "train_shapes_dit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tool, folder: Path, steps: int, *extra):
    tool.main(["--steps", str(steps), "--batch", "2", "--frames", "2", "--size", "16", "--threads", "1", "--warmup", "2",
               "--state", str(folder / "state.json"), "--log", str(folder / "loss.csv"), "--export", str(folder / "model"),
               *extra])


def _state(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / "state.json").read_text())
    return meta, load_file(str(folder / meta["tensors"]))


def test_resumed_training_equals_uninterrupted_and_exports_a_wan_folder(tool, tmp_path):
    split, whole = tmp_path / "split", tmp_path / "whole"
    _run(tool, split, 2, "--no-export")
    meta2, _ = _state(split)
    assert meta2["step"] == 2 and meta2["args"]["model"] == "shapes-dit"
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt") for p in split.rglob("*"))
    _run(tool, split, 4)  # resumes at step 2
    _run(tool, whole, 4)
    (ma, ta), (mb, tb) = _state(split), _state(whole)
    assert ma["step"] == mb["step"] == 4 and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:5]
    assert ma["np_rng"] == mb["np_rng"] and ma["pending_losses"] == mb["pending_losses"]

    from fastdm import DreamMotionPipeline
    from fastdm.shapes import render_clip

    model = split / "model"
    assert json.loads((model / "model_index.json").read_text())["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert not (model / "vae").exists() and json.loads((model / "fastdm.json").read_text())["trained_steps"] == 4
    pipe = DreamMotionPipeline.from_pretrained(str(model))
    assert pipe.backbone.info.space == "pixel" and pipe.backbone.info.native_size == (16, 16)
    clip = render_clip("red", "circle", "right", size=16, frames=4, radius=4, speed=2)
    res = pipe(clip, "a red circle moving right", "a blue circle moving right", steps=1, seed=0)
    assert res.frames.shape == clip.shape and all(np.isfinite(v) for v in res.report["final_losses"].values())


def test_refuses_a_state_of_another_model(tool, tmp_path):
    _run(tool, tmp_path, 1, "--no-export")
    meta = json.loads((tmp_path / "state.json").read_text())
    meta["args"]["model"] = "shapes"
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="not a shapes-dit state"):
        _run(tool, tmp_path, 2, "--no-export")
