"""Cascaded editing (fastdm/cascade): tiny random stage models saved as real diffusers folders."""

import json
from pathlib import Path

import numpy as np
import pytest

from fastdm.cli import main

PROMPTS = ["--source-prompt", "a red circle moving right", "--target-prompt", "a blue circle moving right"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    from fastdm.testing import build_tiny_stage_model

    root = tmp_path_factory.mktemp("stages")
    for kind in ("edit", "upscale", "interpolate", "refine"):
        build_tiny_stage_model(root / kind, kind)
    return root


@pytest.fixture
def clip6(tmp_path):
    from fastdm.io import write_video
    from fastdm.toyworld.world import render_clip

    p = tmp_path / "clip.gif"
    write_video(p, render_clip("red", "circle", "right", size=16, frames=6, radius=4, speed=2), fps=10)
    return p


def _cascade(tmp_path, stages, *extra, name="c.json", edit=None):
    data = {"stages": [edit or {"kind": "edit", "model": str(stages / "edit"), "frames": 4, "size": [16, 16]}, *extra]}
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


UPSCALE = {"kind": "upscale", "scale": 2, "window": 3, "stride": 2, "steps": 2, "noise_level": 50}
REFINE = {"kind": "refine", "strength": 0.5, "steps": 2}


def _run(clip, cascade, out, *extra, capsys=None):
    return main([str(clip), "--cascade", str(cascade), *PROMPTS, "--steps", "2", "--out", str(out), "--quiet", *extra])


def test_edit_upscale_refine_runs_and_reports_every_stage(stages, clip6, tmp_path):
    from fastdm.io import read_frames

    casc = _cascade(tmp_path, stages, {**UPSCALE, "model": str(stages / "upscale")}, {**REFINE, "model": str(stages / "refine")})
    out = tmp_path / "out.mp4"
    assert _run(clip6, casc, out) == 0
    frames, fps, _ = read_frames(out)
    assert frames.shape == (4, 32, 32, 3)
    # 4 keyframes at input frames 0, 2, 3, 5 of a 10 fps clip span 0.5 s: 4 output frames play at 6 fps
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["keyframes"]["input_frame_indices"] == [0, 2, 3, 5]
    assert report["keyframes"]["output_fps"] == pytest.approx(6.0)
    recs = report["cascade"]["stages"]
    assert [r["kind"] for r in recs] == ["edit", "upscale", "refine"]
    assert [r["size_out"] for r in recs] == [[16, 16], [32, 32], [32, 32]]
    for r in recs:
        assert r["seconds"] > 0 and r["peak_memory_bytes"] > 0 and not r["skipped"]
        assert r["model_released"] is True  # each stage's weights were freed before the next stage loaded
    assert recs[0]["edit_report"]["steps_run"] == 2
    # no --mask, no --boxes: the edit stage takes fastdm-edit's default mask mode (the automatic mask), as a plain edit
    assert "auto_mask" in recs[0]["edit_report"] and report["input"]["mask"] == "auto"
    assert report["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in recs)
    assert (tmp_path / "out_compare.mp4").is_file()


def test_interpolation_keeps_the_edited_keyframes_and_their_timing(stages):
    import torch

    from fastdm.cascade import keyframe_positions, output_fps, run_interpolate
    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.cascade.spec import SETTINGS

    assert keyframe_positions(29, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert keyframe_positions(6, 4) == [0, 2, 3, 5] and keyframe_positions(5, None) == [0, 1, 2, 3, 4]
    # 8 keyframes taken from 29 frames at 30 fps, interpolated x4 to 29 frames: back at 30 fps
    assert output_fps(list(range(29)), 30.0, keyframe_positions(29, 8), 29) == pytest.approx(30.0)
    info = check_stage_folder(str(stages / "interpolate"), "interpolate", "t")
    model = load_stage_model(info, "t", device=torch.device("cpu"), dtype=torch.float32)
    keys = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    settings = dict(SETTINGS["interpolate"], factor=3, steps=2, window=2)
    out = run_interpolate(model, keys, "a blue circle", settings)
    assert out.shape == (7, 16, 16, 3)
    np.testing.assert_array_equal(out[::3], keys)  # exactly the edited keyframes, every factor-th frame
    assert not np.array_equal(out[1], out[0])


def test_bad_or_incompatible_stage_folders_fail_before_any_work(stages, clip6, tmp_path, capsys, monkeypatch):
    import fastdm.driver.pipeline as pl

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the checks finished")

    monkeypatch.setattr(pl.DreamMotionPipeline, "from_pretrained", classmethod(no_load))
    (tmp_path / "no_unet").mkdir()
    (tmp_path / "no_unet" / "model_index.json").write_text("{}")
    cases = {
        "missing": ({**UPSCALE, "model": str(tmp_path / "nowhere")}, "does not exist"),
        "incomplete": ({**UPSCALE, "model": str(tmp_path / "no_unet")}, "lacks unet/"),
        "pixel model as upscale": ({**UPSCALE, "model": str(stages / "edit")}, "a upscale UNet takes 6 input channels"),
        "upscale as interpolate": ({"kind": "interpolate", "model": str(stages / "upscale")}, "7 input channels"),
        "pixel model as refine": ({**REFINE, "model": str(stages / "edit")}, "lacks vae/"),
        "unknown setting": ({**UPSCALE, "model": str(stages / "upscale"), "scael": 2}, "unknown setting(s) scael"),
        "bad strength": ({**REFINE, "model": str(stages / "refine"), "strength": 1.5}, "'strength' must be in"),
    }
    for name, (stage, words) in cases.items():
        casc = _cascade(tmp_path, stages, stage, name=f"{name}.json")
        out = tmp_path / f"{name}_out.mp4"
        assert _run(clip6, casc, out) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, (name, err)
        assert not out.exists() and not out.with_suffix(".json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"stages": [{"kind": "upscale", "model": "x"}]}')
    assert _run(clip6, bad, tmp_path / "o.mp4") == 2
    assert "first stage, and only the first, must be the edit stage" in capsys.readouterr().err


def test_show1_folders_need_trust_remote_code_and_the_showone_package(stages, tmp_path, monkeypatch):
    import shutil

    import torch

    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.errors import FastDMError

    sr = tmp_path / "show-1-sr1"
    shutil.copytree(stages / "upscale", sr)
    index = json.loads((sr / "model_index.json").read_text())
    index["unet"] = ["showone", "UNet3DConditionModel"]
    (sr / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FastDMError, match="pass `trust_remote_code`"):
        check_stage_folder(str(sr), "upscale", "s")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "showone" else _real_find(name))
    with pytest.raises(FastDMError, match="showone package is not importable"):
        check_stage_folder(str(sr), "upscale", "s", trust_remote_code=True)
    monkeypatch.undo()
    # a stand-in showone package: its UNet class loads through the same checks
    pkg = tmp_path / "site" / "showone" / "models"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from diffusers import UNet3DConditionModel as _U\n\n\n"
                                     "class UNet3DConditionModel(_U):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    info = check_stage_folder(str(sr), "upscale", "s", trust_remote_code=True)
    assert info.showone
    model = load_stage_model(info, "s", device=torch.device("cpu"), dtype=torch.float32, trust_remote_code=True)
    assert type(model.unet).__module__ == "showone.models"
    # a Show-1 base folder as the edit stage: edited through the UNet3D backbone
    from fastdm.cascade.stages import showone_edit_backbone
    from fastdm.driver import DreamMotionPipeline
    from fastdm.toyworld.world import render_clip

    base = tmp_path / "show-1-base"
    shutil.copytree(stages / "edit", base)
    index = json.loads((base / "model_index.json").read_text())
    index["unet"] = ["showone", "UNet3DConditionModel"]
    (base / "model_index.json").write_text(json.dumps(index))
    info = check_stage_folder(str(base), "edit", "b", trust_remote_code=True)
    bb = showone_edit_backbone(load_stage_model(info, "b", device=torch.device("cpu"), dtype=torch.float32,
                                                trust_remote_code=True), str(base), None)
    clip = render_clip("red", "circle", "right", size=16, frames=2, radius=4, speed=2)
    res = DreamMotionPipeline(bb)(clip, "a red circle", "a blue circle", steps=1)
    assert res.frames.shape == clip.shape and type(bb.unet).__module__ == "showone.models"


def _real_find(name):
    import importlib.machinery

    return importlib.machinery.PathFinder.find_spec(name)


def test_resume_skips_finished_stages(stages, clip6, tmp_path, monkeypatch, capsys):
    import fastdm.cascade.runner as runner
    import fastdm.driver.pipeline as pl

    casc = _cascade(tmp_path, stages, {**UPSCALE, "model": str(stages / "upscale")}, {**REFINE, "model": str(stages / "refine")})
    out = tmp_path / "out.mp4"

    def crash(*a, **k):
        raise RuntimeError("killed")

    real_refine = runner.run_refine
    monkeypatch.setattr(runner, "run_refine", crash)
    assert _run(clip6, casc, out, "--checkpoint-every", "1") == 1  # dies in the refine stage
    assert not out.exists()
    ckpt = tmp_path / "out.ckpt"
    assert sorted(p.name for p in ckpt.glob("stage-*.npy")) == ["stage-0-edit.npy", "stage-1-upscale.npy"]
    monkeypatch.setattr(runner, "run_refine", real_refine)

    def no_load(*a, **k):
        raise AssertionError("the finished edit stage ran again")

    monkeypatch.setattr(pl.DreamMotionPipeline, "from_pretrained", classmethod(no_load))
    monkeypatch.setattr(runner, "run_upscale", no_load)
    capsys.readouterr()
    assert main([str(clip6), "--cascade", str(casc), *PROMPTS, "--steps", "2", "--out", str(out), "--resume", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "stage 1 (edit): done in an earlier run, skipped" in printed and "stage 2 (upscale): done" in printed
    recs = json.loads(out.with_suffix(".json").read_text())["cascade"]["stages"]
    assert [r["skipped"] for r in recs] == [True, True, False]
    # the refine stage ran on the upscale stage's saved frames, exactly as it would have without the crash
    from fastdm.backbone import load_backbone

    want = real_refine(load_backbone(str(stages / "refine")), np.load(ckpt / "stage-1-upscale.npy"), PROMPTS[3], recs[2]["settings"])
    np.testing.assert_array_equal(np.load(ckpt / "stage-2-refine.npy"), want)
    # another prompt is another edit: the checkpoint is refused in one line
    assert main([str(clip6), "--cascade", str(casc), "--source-prompt", "a red circle", "--target-prompt", "a green circle",
                 "--steps", "2", "--out", str(tmp_path / "o2.mp4"), "--resume", str(ckpt)]) == 2
    assert "another cascade, input or options" in capsys.readouterr().err


def test_shapes_cascade_names_its_bundled_folder(tmp_path, monkeypatch, clip6, capsys):
    import fastdm.cascade.spec as spec
    from fastdm.backbone import default_model_path
    from fastdm.cascade import load_cascade

    c = load_cascade("shapes")
    assert [s.kind for s in c.stages] == ["edit", "upscale"]
    assert Path(c.stages[1].model).resolve() == Path(default_model_path()).resolve().parent / "shapes-upscale"
    assert Path(c.stages[0].model).resolve() == Path(default_model_path()).resolve()
    # where that folder is missing, one line says so (the same file, read from a folder without the model)
    data = json.loads(spec.builtin_path("shapes").read_text())
    data["stages"][0]["model"] = default_model_path()
    (tmp_path / "cascades").mkdir()
    (tmp_path / "cascades" / "shapes.json").write_text(json.dumps(data))
    monkeypatch.setattr(spec, "builtin_path", lambda name: tmp_path / "cascades" / "shapes.json")
    assert main([str(clip6), "--cascade", "shapes", *PROMPTS, "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shapes upscale model is not bundled yet" in err


class _RecordingUNet:
    """Stands in for a stage UNet: records each input and predicts zero noise."""

    def __init__(self):
        import torch

        self.inputs, self.torch = [], torch

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        self.inputs.append((sample.clone(), int(timestep)))
        return (self.torch.zeros(sample.shape[0], 3, *sample.shape[2:]),)

    __call__ = forward


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_conditioned_sampling_starts_from_the_noised_estimate(strength):
    """The chain starts at the first kept timestep from ``init`` noised as the forward process would
    (a schedule whose x_T still carries signal expects it); without ``init`` from pure noise; ``strength``
    keeps the last round(n * strength) timesteps."""
    from types import SimpleNamespace

    import torch
    from diffusers import DDIMScheduler

    from fastdm.cascade import sample_conditioned

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    init = -torch.ones(1, 3, 4, 16, 16)  # a black clip
    cond = torch.zeros(1, 3, 4, 16, 16)
    text = torch.zeros(2, 4, 8)
    starts = {}
    for use_init in (True, False):
        unet = _RecordingUNet()
        model = SimpleNamespace(scheduler=sched, unet=unet, device=torch.device("cpu"), dtype=torch.float32,
                                info=SimpleNamespace(learned_variance=False))
        sample_conditioned(model, cond, text, steps=10, guidance_scale=3.0, gen=torch.Generator().manual_seed(0),
                           init=init if use_init else None, strength=strength)
        assert len(unet.inputs) == round(10 * strength)
        x0, t0 = unet.inputs[0]
        assert x0.shape == (2, 6, 4, 16, 16)  # [x_t, cond] for [negative, prompt]
        assert t0 == int(sched.timesteps[10 - round(10 * strength)])
        starts[use_init] = x0[0, :3]
    abar = float(sched.alphas_cumprod[t0])
    noise = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(starts[True], (abar ** 0.5 * init + (1 - abar) ** 0.5 * noise)[0])
    torch.testing.assert_close(starts[False], noise[0])


def test_stage_start_setting_is_checked():
    from fastdm.cascade.spec import parse_cascade
    from fastdm.errors import FastDMError

    with pytest.raises(FastDMError, match="'start' must be \"estimate\""):
        parse_cascade({"stages": [{"kind": "edit"}, {"kind": "upscale", "model": "m", "start": "zeros"}]}, source="t",
                      base_dir=Path("."))


BAD_STAGES = [
    {"kind": "upscale", "model": "m", "scael": 2},
    {"kind": "refine", "model": "m", "strength": 1.5},
    {"kind": "refine", "model": "m", "strength": 0},
    {"kind": "upscale", "model": "m", "steps": "50"},
    {"kind": "upscale", "model": "m", "steps": True},
    {"kind": "upscale", "model": "m", "steps": 0},
    {"kind": "interpolate", "model": "m", "factor": 1},
    {"kind": "upscale", "model": "m", "size": [64]},
    {"kind": "upscale", "model": "m", "size": [64, -1]},
    {"kind": "upscale", "model": "m", "start": "zeros"},
    {"kind": "upscale", "model": "m", "negative_prompt": 3},
    {"kind": "upscale", "model": "m", "noise_level": -1},
    {"kind": "upscale"},
    {"kind": "upscale", "model": ""},
    {"kind": "edit", "frames": 0},
    {"kind": "zoom", "model": "m"},
]


@pytest.mark.parametrize("stage", BAD_STAGES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "model"))
def test_declared_cascade_schema_and_parser_reject_the_same_stages(stage):
    """The whole-file JSON Schema (fastdm.schema.cascade_schema) and parse_cascade agree: a bad stage fails
    both, with one line from the parser naming the stage and the setting."""
    import jsonschema

    from fastdm.cascade.spec import parse_cascade
    from fastdm.errors import BadInput
    from fastdm.schema import cascade_schema

    data = {"stages": [{"kind": "edit"}, stage]}
    assert list(jsonschema.Draft202012Validator(cascade_schema()).iter_errors(data)), "the schema accepted it"
    with pytest.raises(BadInput) as e:
        parse_cascade(data, source="t.json", base_dir=Path("."))
    msg = str(e.value)
    assert msg.startswith("cascade t.json: stage 2") and "\n" not in msg and e.value.code == "bad_input"
    bad = [k for k in stage if k not in ("kind", "model")] or ["model" if stage.get("kind") != "zoom" else "kind"]
    assert any(k in msg for k in bad + ["unknown kind"]), msg


def test_bundled_cascade_fits_the_declared_schema():
    import json

    import jsonschema

    from fastdm.cascade.spec import builtin_path, load_cascade
    from fastdm.schema import cascade_schema

    jsonschema.validate(json.loads(builtin_path("shapes").read_text()), cascade_schema())
    c = load_cascade("shapes")
    assert [s.kind for s in c.stages][0] == "edit"
    assert all(isinstance(v, int) for s in c.stages for k, v in s.settings.items() if k in ("steps", "seed", "window"))


GOOD_STAGES = [
    {"kind": "edit", "model": None},
    {"kind": "upscale", "model": "m", "steps": 8.0, "size": [64.0, 40.0]},  # JSON Schema: 8.0 is an integer
    {"kind": "refine", "model": "m", "strength": 1, "size": None},
    {"kind": "interpolate", "model": "m", "factor": 2, "start": "noise", "negative_prompt": ""},
]


@pytest.mark.parametrize("stage", GOOD_STAGES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_declared_cascade_schema_and_parser_accept_the_same_stages(stage):
    import jsonschema

    from fastdm.cascade.spec import parse_cascade
    from fastdm.schema import cascade_schema

    data = {"stages": [{"kind": "edit"}, stage] if stage["kind"] != "edit" else [stage], "description": "d"}
    jsonschema.validate(data, cascade_schema())
    c = parse_cascade(data, source="t.json", base_dir=Path("."))
    got = c.stages[-1].settings
    assert all(type(got[k]) is int for k in ("steps", "factor") if k in got)
    assert got.get("size") in (None, [64, 40]) and all(type(v) is int for v in got.get("size") or [])


def test_cascade_description_must_be_a_string():
    import jsonschema

    from fastdm.cascade.spec import parse_cascade
    from fastdm.errors import BadInput
    from fastdm.schema import cascade_schema

    data = {"stages": [{"kind": "edit"}], "description": 3}
    assert list(jsonschema.Draft202012Validator(cascade_schema()).iter_errors(data))
    with pytest.raises(BadInput, match="'description' must be a string"):
        parse_cascade(data, source="t.json", base_dir=Path("."))


def test_a_cascade_holds_only_its_keyframes_and_the_comparisons_frames(stages, clip6, tmp_path, monkeypatch):
    """The input is decoded frame by frame (the probe), then only the keyframes (at the source size) and the frames
    the comparison shows (at the output size) are held: every read picks."""
    import fastdm.io as io

    calls = []
    real = io.read_frames

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(io, "read_frames", spy)
    out = tmp_path / "out.mp4"
    assert _run(clip6, _cascade(tmp_path, stages), out, "--start", "0.1") == 0
    assert len(calls) == 2 and all(k.get("pick") is not None for k in calls)
    assert calls[0]["pick"] == [0, 1, 3, 4] and calls[1]["size"] == (16, 16) and calls[0]["start"] == 0.1
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["keyframes"]["input_frame_indices"] == [1, 2, 4, 5]  # (frames 1..5 from 0.1 s at 10 fps)
    assert real(tmp_path / "out_compare.mp4")[0].shape == (4, 16, 32, 3)
