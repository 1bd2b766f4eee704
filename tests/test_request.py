"""The request layer under every front end: EditRequest + run, its result object, typed errors."""

from __future__ import annotations

import json

import pytest

import fastdm.request as request_mod
from fastdm.errors import BadInput, FastDMError, ResumeMismatch, Unsupported
from fastdm.request import EditRequest, run

SRC, TGT = "a red circle moving right", "a blue circle moving right"


@pytest.fixture
def spy(monkeypatch):
    """Every call of fastdm.request.run, whoever makes it."""
    calls = []
    real = request_mod.run

    def wrapped(req, **kw):
        calls.append((req, kw))
        return real(req, **kw)

    monkeypatch.setattr(request_mod, "run", wrapped)
    return calls


def test_run_returns_the_result_it_wrote(tiny_model, clip_file, tmp_path):
    out = tmp_path / "e.gif"
    res = run(EditRequest(str(clip_file), SRC, TGT, out=str(out), model=tiny_model, steps=2, mask="none"))
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert res.report["report_path"] == str(out.with_suffix(".json"))
    assert {k: v for k, v in res.report.items() if k != "report_path"} == on_disk
    assert res.steps_run == 2 and res.evaluations.forward == 8 and res.timings.load_s is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "e.gif", "e.json", "e_compare.gif"]


def test_the_command_line_goes_through_the_request_layer(spy, tiny_model, clip_file, tmp_path):
    from fastdm.cli import main

    assert main([str(clip_file), "--model", tiny_model, "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "1",
                 "--out", str(tmp_path / "o.gif"), "--quiet", "--mask", "none", "--seed", "3"]) == 0
    (req, _), = spy
    assert isinstance(req, EditRequest) and req.steps == 1 and req.seed == 3 and req.config().seed == 3


def test_batch_jobs_are_requests_checked_by_the_same_run(spy, tiny_model, clip_file, tmp_path):
    from fastdm.service.batch import check_job, job_request, read_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"input": str(clip_file), "source_prompt": SRC, "target_prompt": TGT, "steps": 3,
                                    "preset": "paper", "weighting": "sds"}) + "\n")
    (job,) = read_manifest(manifest)
    req = job_request(job, tmp_path / "out", model=tiny_model)
    assert isinstance(req, EditRequest) and req.preset == "paper"
    cfg = req.config()
    assert cfg.steps == 3 and cfg.lr == 0.4 and cfg.weighting == "sds"
    (tmp_path / "out").mkdir()
    check_job(job, tmp_path / "out", model=tiny_model)
    assert len(spy) == 1 and spy[0][1] == {"check_only": True}


def test_the_app_builds_a_request(tiny_model, clip_file, tmp_path):
    pytest.importorskip("gradio")
    from fastdm.service.app import EditService

    svc = EditService(pipe=None, model=tiny_model, device="cpu", dtype="fp32", out_root=tmp_path)
    req, _ = svc._args(tmp_path, str(clip_file), None, SRC, TGT, "", None, 5, 0.4, 7.5, 0, "fast", 2, "none")
    assert isinstance(req, EditRequest) and req.steps == 5 and req.frames == 2 and req.mask == "none"


@pytest.mark.parametrize("fields,cls,code,field", [
    ({"steps": "many"}, BadInput, "bad_input", "steps"),
    ({"max_steps": 10}, BadInput, "bad_input", "max_steps"),
    ({"preset": "fastest"}, BadInput, "bad_input", "preset"),
    ({"plan": "naive", "backend": "ort"}, Unsupported, "unsupported", "backend"),
    ({"settings": {"colour": "blue"}}, BadInput, "bad_input", "settings"),
])
def test_errors_are_typed(fields, cls, code, field):
    with pytest.raises(cls) as e:
        EditRequest("in.gif", SRC, TGT, **fields).config()
    assert e.value.code == code and e.value.field == field and isinstance(e.value, FastDMError)
    assert e.value.to_dict() == {"code": code, "message": str(e.value), "field": field}


def test_resume_of_another_edit_is_a_resume_mismatch(tiny_model, clip_file, tmp_path):
    out = tmp_path / "e.gif"
    base = dict(out=str(out), model=tiny_model, steps=2, mask="none", checkpoint_every=1, no_compare=True)
    run(EditRequest(str(clip_file), SRC, TGT, **base))
    with pytest.raises(ResumeMismatch, match="different configuration"):
        run(EditRequest(str(clip_file), SRC, TGT, **{**base, "steps": 3, "seed": 5, "resume": str(out.with_suffix(".ckpt"))}))


def test_settings_come_in_layers_and_the_report_names_each_ones_source(tmp_path):
    """Built-in defaults < the family's fallback (its pipeline's guidance) < the folder's fastdm.json defaults < a
    named preset < what the user gives; the report says where each setting came from."""
    import json

    from fastdm.request import folder_defaults
    from fastdm.driver.config import resolve_config
    from fastdm.errors import BadInput
    from fastdm.request import EditRequest, run
    from fastdm.testing import build_tiny_ltx_model

    cfg, src = resolve_config(None, "a", "b", {"lr": 0.3}, model_defaults={"steps": 7, "guidance_scale": 4.0},
                              family_defaults={"guidance_scale": 3.0, "t_min": 100}, family="family LTX")
    assert (cfg.lr, cfg.steps, cfg.guidance_scale, cfg.t_min, cfg.optimizer) == (0.3, 7, 4.0, 100, "sgd")
    assert (src["lr"], src["steps"], src["guidance_scale"], src["t_min"], src["optimizer"]) == \
        ("given", "fastdm.json", "fastdm.json", "family LTX", "default")
    # the preset pins the paper's schedule and loss weights (a measured folder's S-SSM weight too); the rest stays the folder's
    cfg, src = resolve_config("paper", "a", "b", {}, model_defaults={"steps": 7, "s_ssm_weight": 10.0, "mask_scope": "vdds"})
    assert (cfg.steps, src["steps"], cfg.s_ssm_weight, src["s_ssm_weight"]) == (200, "preset paper", 3000.0, "preset paper")
    assert (cfg.mask_scope, src["mask_scope"]) == ("vdds", "fastdm.json")

    folder = build_tiny_ltx_model(tmp_path / "ltx", native_size=(32, 32), frames=9)
    assert folder_defaults(str(folder)) == ({}, {"guidance_scale": 3.0}, "family LTX-Video 0.9.5 and later, 2B and 13B")
    meta = json.loads((folder / "fastdm.json").read_text())
    (folder / "fastdm.json").write_text(json.dumps({**meta, "defaults": {"steps": 2, "guidance_scale": 2.5}}))
    clip = tmp_path / "c.gif"
    from fastdm.io import write_video
    from fastdm.toyworld.world import render_clip

    write_video(clip, render_clip("red", "circle", "right", size=32, frames=9, radius=8, speed=2), 8)
    res = run(EditRequest(str(clip), "a red circle moving right", "a blue circle moving right", model=str(folder),
                          out=str(tmp_path / "o.mp4"), mask="none", lr=0.05, quiet=True))
    rep = json.loads((tmp_path / "o.json").read_text())
    assert res.report["steps_run"] == 2 and rep["config"]["guidance_scale"] == 2.5
    assert rep["settings_source"]["steps"] == "fastdm.json" and rep["settings_source"]["lr"] == "given"
    assert rep["settings_source"]["optimizer"] == "default"
    from fastdm import DreamMotionPipeline  # the Python API resolves the same layers from the loaded folder

    api = DreamMotionPipeline.from_pretrained(str(folder))(render_clip("red", "circle", "right", size=32, frames=9, radius=8,
                                                                          speed=2), "a red circle moving right",
                                                           "a blue circle moving right", mask=None, lr=0.05)
    assert api.report["steps_run"] == 2 and api.report["settings_source"]["guidance_scale"] == "fastdm.json"
    (folder / "fastdm.json").write_text(json.dumps({**meta, "defaults": {"stepz": 2}}))
    with pytest.raises(BadInput, match="unknown setting.*stepz"):
        EditRequest(str(clip), "a", "b", model=str(folder)).config()


def test_a_folders_continuation_meets_the_requests_other_settings(clip_file, tmp_path, extending_folder):
    """A model folder whose fastdm.json says stop=extend (8 steps, up to 3 segments of 4; rule 9c): its extend settings are
    accepted without --stop; too few steps turn the rule off and then refuse them, saying why; steps=auto caps at the
    schedule's 20 steps (the convergence rule cannot stop before 12); the flags reach the request; the app's step
    limit counts the segments."""
    from fastdm.cli import build_parser

    config = EditRequest("in.gif", SRC, TGT, model=extending_folder, extend_tol=2.0, extend_on="speed").config()
    assert (config.stop, config.extend_tol, config.extend_on, config.cap) == ("extend", 2.0, "speed", 20)
    with pytest.raises(BadInput, match=r"`extend_tol` is the ratio of `stop=extend`, and this edit runs `stop=steps` "
                                       r"\(fastdm.json: extend off, 3 steps are too few to judge\)"):
        EditRequest("in.gif", SRC, TGT, model=extending_folder, steps=3, extend_tol=2.0).config()
    auto = EditRequest("in.gif", SRC, TGT, model=extending_folder, steps="auto")
    assert (auto.config().stop, auto.config().steps, auto.config().cap) == ("converged", 20, 20)
    assert "continuation segments" in auto.settings_source["steps"]
    assert EditRequest("in.gif", SRC, TGT, model=extending_folder, steps="auto", max_steps=30).config().steps == 30
    assert EditRequest("in.gif", SRC, TGT, model=extending_folder, steps="auto", preset="paper").config().steps == 200
    args = build_parser().parse_args(["in.gif", "--source-prompt", SRC, "--target-prompt", TGT, "--extend-on", "vdds",
                                      "--extend-tol", "1.3", "--model", extending_folder])
    req = EditRequest.from_args(args)
    assert (req.extend_on, req.extend_tol) == ("vdds", 1.3) and req.config().extend_tol == 1.3
    pytest.importorskip("gradio")
    from fastdm.service.app import EditService

    svc = EditService(pipe=None, model=extending_folder, device="cpu", dtype="fp32", out_root=tmp_path, max_steps=16)
    with pytest.raises(BadInput, match=r"`steps=8` \(20 with the model's continuation segments\) is above this server's limit of 16"):
        svc._args(tmp_path, str(clip_file), None, SRC, TGT, "", None, 8, 2.4, 7.5, 0, "fast", 2, "none")
    req, _ = svc._args(tmp_path, str(clip_file), None, SRC, TGT, "", None, 4, 2.4, 7.5, 0, "fast", 2, "none")
    assert req.config().cap == 4  # (too few steps for the rule: it is off, and 4 is within the limit)
