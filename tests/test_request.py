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
