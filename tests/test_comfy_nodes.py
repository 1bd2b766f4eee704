"""fastdm's ComfyUI nodes called directly, as ComfyUI's executor calls them (under ``torch.inference_mode()``),
and the pack installer on a folder shaped like ComfyUI. The same nodes run inside a real ComfyUI server in
``tests/test_comfyui.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdm
from fastdm.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from fastdm.comfy import install as comfy_install
from fastdm.comfy.nodes import FastDMAutoMask, FastDMEdit, FastDMLoadPipeline, FastDMLoadVideo, FastDMSaveVideo
from fastdm.errors import FastDMError
from fastdm.toyworld.metrics import centroid_drift, colour_of

CLIPS = Path(fastdm.__file__).parent / "assets" / "clips"
CLIP = CLIPS / "red_circle_right.gif"
SOURCE, TARGET = "a red circle moving right", "a blue circle moving right"


@pytest.fixture(scope="module")
def pipeline():
    with torch.inference_mode():  # as ComfyUI runs every node
        (holder,) = FastDMLoadPipeline().load("shapes", device="cpu", dtype="auto")
    return holder


@pytest.fixture(scope="module")
def frames():
    with torch.inference_mode():
        image, fps, count = FastDMLoadVideo().load("", path=str(CLIP))
    return image, fps, count


def test_the_mappings_name_every_node_once():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        assert "required" in types and callable(getattr(cls, cls.FUNCTION)), name
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY == "fastdm"


def test_load_video_gives_an_image_batch_and_resizes_while_decoding(frames):
    image, fps, count = frames
    assert image.dtype == torch.float32 and image.shape == (count, 32, 32, 3) and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert fps > 0 and count == 8
    with torch.inference_mode():
        small, fps2, n = FastDMLoadVideo().load("", frame_cap=3, stride=2, width=16, height=8, path=str(CLIP))
    assert small.shape == (3, 8, 16, 3) and n == 3 and fps2 == pytest.approx(fps / 2)
    with torch.inference_mode():  # a part in seconds: the clip's frames from 2/fps s up to (not at) 6/fps s
        part, _, n = FastDMLoadVideo().load("", path=str(CLIP), start_seconds=2 / fps, end_seconds=6 / fps)
    assert n == 4 and torch.equal(part, image[2:6])
    assert "must come after" in FastDMLoadVideo.VALIDATE_INPUTS(video="", path=str(CLIP), start_seconds=1.0, end_seconds=0.5)


def test_edit_under_inference_mode_turns_the_circle_blue(pipeline, frames):
    image, _, count = frames
    with torch.inference_mode():  # the edit leaves it (it backpropagates into the model's tapped layers)
        out = FastDMEdit().edit(pipeline, image, SOURCE, TARGET, seed=0)
    edited, used, text = out["result"]
    assert edited.shape == image.shape and used.shape == (count, 32, 32)
    report = json.loads(text)
    assert out["ui"]["text"] == [text] and report["auto_mask"]["fallback"] is None
    # the bundled UNet's own schedule (its fastdm.json): 12 steps at lr 4.0, S-SSM 6000
    assert report["steps_run"] == 12 and report["config"]["lr"] == 4.0 and report["config"]["s_ssm_weight"] == 6000.0
    assert 0 < float(used.mean()) < 1  # the automatic mask: a region, not the whole frame
    src_u8 = (image.numpy() * 255).round().astype(np.uint8)
    frames_u8 = (edited.numpy() * 255).round().astype(np.uint8)
    assert [colour_of(f) for f in frames_u8] == ["blue"] * count
    assert centroid_drift(src_u8, frames_u8) < 1.5  # it keeps its place and motion


def test_given_mask_of_another_size_is_refused_with_fastdms_message(pipeline, frames):
    image, _, count = frames
    with torch.inference_mode(), pytest.raises(FastDMError, match=r"the mask is 1x16x16 .* but the frames are 8x32x32"):
        FastDMEdit().edit(pipeline, image, SOURCE, TARGET, steps=1, mask=torch.ones(16, 16))
    with torch.inference_mode(), pytest.raises(FastDMError, match="mask is 3x32x32"):
        FastDMEdit().edit(pipeline, image, SOURCE, TARGET, steps=1, mask=torch.ones(3, 32, 32))


def test_boxes_and_a_single_mask_limit_the_edit(pipeline, frames):
    image, _, _ = frames
    with torch.inference_mode():
        out = FastDMEdit().edit(pipeline, image, SOURCE, TARGET, steps=2, boxes="[[0, 0, 16, 32]]")
        _, used, _ = out["result"]
        assert float(used[:, :, :16].mean()) == 1.0 and float(used[:, :, 16:].mean()) == 0.0
        one = torch.zeros(32, 32)
        one[8:24, 8:24] = 1
        _, used2, _ = FastDMEdit().edit(pipeline, image, SOURCE, TARGET, steps=1, mask=one)["result"]
    assert torch.equal(used2, one.expand(8, 32, 32))


def test_auto_mask_node_gives_the_mask_at_the_frames_size(pipeline):
    with torch.inference_mode():
        big, _, _ = FastDMLoadVideo().load("", width=64, height=64, path=str(CLIP))
        mask, text = FastDMAutoMask().mask(pipeline, big, SOURCE, TARGET)
    assert mask.shape == (8, 64, 64) and 0 < float(mask.mean()) < 0.5
    assert json.loads(text)["words"] == {"source": ["red"], "target": ["blue"]}


def test_validate_inputs_says_what_is_wrong():
    assert FastDMEdit.VALIDATE_INPUTS(source_prompt=" ", target_prompt="x").startswith("source_prompt is empty")
    assert "not valid JSON" in FastDMEdit.VALIDATE_INPUTS(source_prompt="a", target_prompt="b", boxes="[[0, 0")
    assert FastDMEdit.VALIDATE_INPUTS(source_prompt="a", target_prompt="b") is True
    assert "does not exist" in FastDMLoadPipeline.VALIDATE_INPUTS(model="shapes", model_path="/no/such/model")
    assert FastDMLoadPipeline.VALIDATE_INPUTS(model="shapes") is True
    assert "not a size" in FastDMLoadPipeline.VALIDATE_INPUTS(model="shapes", memory_budget="lots")
    assert "does not exist" in FastDMLoadVideo.VALIDATE_INPUTS(video="", path="/no/clip.mp4")
    assert "no video" in FastDMLoadVideo.VALIDATE_INPUTS(video="", path="")


def test_save_video_writes_a_gif_it_names_in_the_ui(tmp_path, monkeypatch, frames):
    monkeypatch.chdir(tmp_path)  # outside ComfyUI it writes into the working directory
    image, fps, _ = frames
    out = FastDMSaveVideo().save(image, fps, "clip", "gif")
    (entry,) = out["ui"]["images"]
    assert (tmp_path / entry["filename"]).is_file() and entry["type"] == "output"


def test_installer_writes_one_folder_and_removes_only_its_own(tmp_path, capsys):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    (comfy / "custom_nodes" / "other_pack").mkdir()
    assert comfy_install.main(["install", str(comfy)]) == 0
    pack = comfy / "custom_nodes" / "fastdm_nodes"
    assert sorted(p.name for p in pack.iterdir()) == [".fastdm-pack.json", "__init__.py", "pyproject.toml", "requirements.txt"]
    assert sorted(p.name for p in (comfy / "custom_nodes").iterdir()) == ["fastdm_nodes", "other_pack"]
    assert "[tool.comfy]" in (pack / "pyproject.toml").read_text()
    ns: dict = {}
    exec(compile((pack / "__init__.py").read_text(), str(pack / "__init__.py"), "exec"), ns)  # what ComfyUI's loader runs
    assert ns["NODE_CLASS_MAPPINGS"] is NODE_CLASS_MAPPINGS
    assert comfy_install.main(["install", str(comfy)]) == 0  # again: refreshed, still one folder
    assert comfy_install.main(["install", str(comfy), "--uninstall"]) == 0 and not pack.exists()
    assert (comfy / "custom_nodes" / "other_pack").is_dir()
    (comfy / "custom_nodes" / "fastdm_nodes").mkdir()  # somebody else's folder of that name
    capsys.readouterr()
    assert comfy_install.main(["install", str(comfy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by fastdm-comfy" in err
    assert comfy_install.main(["uninstall", str(comfy)]) == 2 and (comfy / "custom_nodes" / "fastdm_nodes").is_dir()
    assert comfy_install.main(["install", str(tmp_path / "nothing")]) == 2


def test_on_cuda_comfys_models_are_unloaded_first_and_the_budget_reads_free_memory(monkeypatch):
    """No GPU here: ComfyUI's model management and the CUDA memory query are stood in for, to check the
    calls and the arithmetic (the edit itself is not run)."""
    import sys
    import types

    from fastdm.comfy import nodes

    calls, free = [], [2 * 2**30]
    mm = types.ModuleType("comfy.model_management")
    mm.unload_all_models = lambda: (calls.append("unload"), free.__setitem__(0, free[0] + 5 * 2**30))
    mm.soft_empty_cache = lambda force=False: calls.append("empty")
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free[0], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = nodes._free_comfy_models("cuda")
    assert calls == ["unload", "empty"] and got["freed_bytes"] == 5 * 2**30 and got["free_bytes"] == 7 * 2**30
    assert nodes._free_comfy_models("cpu") == {"device": "cpu", "unloaded": False, "freed_bytes": 0}
    holder = nodes.FastDMPipeline(None, "shapes", "cuda", "bf16", "fit free memory", None, "eager", "sdpa")
    req = holder.request(input="x", source_prompt="a", target_prompt="b")
    assert req.memory_budget == str(7 * 2**30) and req.plan is None
    fixed = nodes.FastDMPipeline(None, "shapes", "cuda", "bf16", "lean", None, "eager", "sdpa").request(input="x", source_prompt="a",
                                                                                                  target_prompt="b")
    assert fixed.plan == "lean" and fixed.memory_budget is None


def test_the_ui_workflow_is_the_api_workflow():
    """examples/comfyui/edit.json (UI format, saved from ComfyUI's page by tools/comfyui_screenshot.py) holds the
    nodes, links and settings of edit.api.json (API format, what tests/test_comfyui.py runs)."""
    root = Path(__file__).resolve().parents[1] / "examples" / "comfyui"
    api = json.loads((root / "edit.api.json").read_text())
    ui = json.loads((root / "edit.json").read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert {k: v["class_type"] for k, v in api.items()} == {k: n["type"] for k, n in nodes.items()}
    links = {(str(src), slot, str(dst), dslot) for _, src, slot, dst, dslot, _ in ui["links"]}
    for nid, node in api.items():
        wanted = []
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                (slot,) = [i for i, inp in enumerate(nodes[nid]["inputs"]) if inp["name"] == name]
                assert (value[0], value[1], nid, slot) in links, (nid, name)
            else:
                wanted.append(value)
        have = iter(nodes[nid].get("widgets_values") or [])
        assert all(any(v == w for w in have) for v in wanted), (nid, wanted, nodes[nid].get("widgets_values"))
    assert api["2"]["inputs"]["video"] == "red_circle_right.gif"
    assert {"source_prompt", "target_prompt"} <= set(api["3"]["inputs"])
