"""DreamMotionPipeline: engines built once, threads, callbacks, refusals, plans compared step by step."""

import threading

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline, FastDMError

SRC, TGT = "a red circle moving right", "a blue circle moving right"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return DreamMotionPipeline.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def latent_pipe(tiny_latent_model):
    return DreamMotionPipeline.from_pretrained(tiny_latent_model)


def test_three_edits_build_the_ort_engine_once(tiny_model, clip, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import fastdm.driver.engines as engines

    exports = []
    real = engines.export_onnx
    monkeypatch.setattr(engines, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    pipe = DreamMotionPipeline.from_pretrained(tiny_model)
    reports = [pipe(clip, SRC, tgt, steps=1, backend="ort", engine_cache=str(tmp_path)).report
               for tgt in (TGT, "a green circle moving right", "a blue square moving right")]
    assert len(exports) == 1 and len(list(tmp_path.glob("unet-*.onnx"))) == 1
    assert [b["kind"] for b in pipe.engine_builds] == ["ort"]
    assert reports[0]["timings"]["engine_build_s"] > 0
    assert [r["timings"]["engine_build_s"] for r in reports[1:]] == [0.0, 0.0]
    assert all(r["engine"]["nograd"] == "ort" for r in reports)


def test_two_threads_get_exactly_the_sequential_results(pipe, clip):
    jobs = [dict(target_prompt=TGT, seed=1, steps=3), dict(target_prompt="a green square moving right", seed=2, steps=3,
                                                           plan="lean")]
    seq = [pipe(clip, SRC, **j).working for j in jobs]
    out = [None, None]

    def work(i):
        out[i] = pipe(clip, SRC, **jobs[i]).working

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.equal(seq[0], seq[1])
    assert torch.equal(out[0], seq[0]) and torch.equal(out[1], seq[1])


def test_two_threads_with_a_memory_budget_and_an_engine_get_their_sequential_results(pipe, clip):
    """The budget's probes run whole steps under the pipeline's lock, beside another thread's edit on an
    onnxruntime engine; each gets what it gets alone, and the overlapping calls say their peaks are shared."""
    pytest.importorskip("onnxruntime")
    jobs = [dict(target_prompt=TGT, seed=1, steps=2, memory_budget=2**40),
            dict(target_prompt="a green square moving right", seed=2, steps=2, backend="ort")]
    seq = [pipe(clip, SRC, **j) for j in jobs]
    out = [None, None]
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        out[i] = pipe(clip, SRC, **jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seq[0].report["memory_budget"]["probed_peak_bytes"] and seq[1].report["engine"]["nograd"] == "ort"
    for got, want in zip(out, seq):
        assert torch.equal(got.working, want.working)
    assert not seq[0].report["peak_memory_kind"].endswith("_shared")  # alone: its own high-water mark
    assert any(r.report["peak_memory_kind"].endswith("_shared") for r in out)  # together: said to be shared


def test_callback_names_are_checked_before_the_first_step(pipe, clip):
    calls = []
    with pytest.raises(FastDMError, match="unknown \\['lossez'\\]"):
        pipe(clip, SRC, TGT, steps=3, callback_on_step_end=lambda *a: calls.append(a),
             callback_on_step_end_tensor_inputs=("lossez",))
    assert calls == []


def test_callback_reads_replaces_and_stops(pipe, clip):
    seen = []
    marker = {}

    def cb(p, step, t, tensors):
        assert p is pipe and 50 <= t <= 950
        seen.append((step, sorted(tensors), float(tensors["losses"]["vdds"])))
        if step == 2:
            marker["x"] = torch.full_like(tensors["x"], 0.25)
            return {"x": marker["x"], "stop": True}
        return None

    res = pipe(clip, SRC, TGT, steps=5, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=("x", "losses"))
    assert [s[0] for s in seen] == [1, 2] and seen[0][1] == ["losses", "x"]
    assert res.report["steps_run"] == 2 and res.report["stopped_early"]
    assert torch.equal(res.working, marker["x"])


def test_prompt_cache_is_bounded(tiny_model):
    p = DreamMotionPipeline.from_pretrained(tiny_model, prompt_cache_size=2)
    a = p.encode_prompts(["a red circle"])
    p.encode_prompts(["a blue circle", "a green circle"])
    assert p.cached_prompts == ["a blue circle", "a green circle"]
    assert torch.equal(p.encode_prompts(["a red circle"]), a)  # re-encoded, same embedding
    assert p.cached_prompts == ["a green circle", "a red circle"]


@pytest.mark.parametrize("opts,match", [
    (dict(plan="naive", backend="compile"), "baseline that runs eager PyTorch only"),
    (dict(plan="plain", backend="ort"), "baseline that runs eager PyTorch only"),
    (dict(plan="naive", compile_grad=True), "does not have"),
    (dict(backend="ort", s_ssm_weight=0, t_ssm_weight=0), "with both weights 0 use `backend=eager`"),
    (dict(backend="cudagraphs"), "needs the model on a CUDA GPU"),
    (dict(backend="trt"), "TensorRT needs a CUDA GPU"),
    (dict(plan="quick"), "unknown plan 'quick'"),
    (dict(stepz=3), "unknown setting"),
])
def test_impossible_combinations_refuse_with_the_reason(pipe, clip, opts, match):
    if torch.cuda.is_available() and opts.get("backend") in ("cudagraphs", "trt"):
        pytest.skip("a GPU is present")
    with pytest.raises(FastDMError, match=match):
        pipe(clip, SRC, TGT, steps=1, **opts)


def test_non_finite_edit_stops_and_keeps_the_last_checkpoint(pipe, clip, tmp_path):
    def poison(_p, step, _t, tensors):
        return {"x": torch.full_like(tensors["x"], float("nan"))} if step == 3 else None

    ck = tmp_path / "ck"
    with pytest.raises(FastDMError, match=r"diverged by step 4 .*not finite.*last good checkpoint is kept"):
        pipe(clip, SRC, TGT, steps=6, checkpoint_dir=str(ck), checkpoint_every=2, callback_on_step_end=poison)
    import json

    assert json.loads((ck / "checkpoint.json").read_text())["step"] == 2


def test_lean_plan_runs_the_ort_engine_at_batch_one(latent_pipe, clip, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    eager = latent_pipe(clip, SRC, TGT, steps=2, seed=1, plan="lean")
    ort = latent_pipe(clip, SRC, TGT, steps=2, seed=1, plan="lean", backend="ort", engine_cache=str(tmp_path))
    assert ort.report["engine"]["nograd"] == "ort" and ort.report["plan"]["name"] == "lean"
    assert [b["batch"] for b in latent_pipe.engine_builds if b["kind"] == "ort"] == [1]
    x0 = latent_pipe.backbone.to_working(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert ((ort.working - eager.working).norm() / (eager.working - x0).norm()) < 1e-4


# -- every plan against naive, one step from an edited tensor that differs from the source ---------
# The gradient is split into its V-DDS, S-SSM and T-SSM parts (S-SSM/T-SSM at unit weight), so each
# structure/motion gradient is compared on its own, not hidden inside the larger V-DDS update.
# Measured on the tiny latent model, fp32 CPU (relative error against naive over these settings):
# V-DDS <= 3e-7, S-SSM <= 2e-6, T-SSM <= 4e-6 (see the assertion message); tolerance 1e-4 (25x margin).
SETTINGS = {
    "defaults": {},
    "sds weighting": {"weighting": "sds"},
    "negative prompt": {"negative_prompt": "a blurry video"},
    "t fixed at 700": {"t_min": 700, "t_max": 700},
}


def one_step_parts(pipe, clip, plan, settings):
    # (the paper's draw of t and noise: the inputs this comparison was calibrated on)
    run = pipe.prepare(clip, SRC, TGT, steps=1, seed=4, plan=plan, split_gradients=True, **{"t_schedule": "uniform", **settings})
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        run.x.add_(0.3 * torch.randn(run.x.shape, generator=gen))
    run.step()
    return {k: v.detach().clone() for k, v in run.tensors(("grad_parts",))["grad_parts"].items()}, run.last_t


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
def test_every_plan_matches_naive_term_by_term(latent_pipe, clip, settings):
    base, t = one_step_parts(latent_pipe, clip, "naive", settings)
    if settings.get("t_min"):
        assert t == 700
    for k in ("vdds", "s_ssm", "t_ssm"):
        assert base[k].abs().max() > 0, k
    for plan in ("plain", "fast", "fast-seq", "lean"):
        got, _ = one_step_parts(latent_pipe, clip, plan, settings)
        errs = {k: float((got[k] - base[k]).norm() / base[k].norm()) for k in base}
        assert max(errs.values()) < 1e-4, (plan, errs)


def test_settings_change_the_update(latent_pipe, clip):
    """sds weighting, the negative prompt and the timestep range each reach the step."""
    base, _ = one_step_parts(latent_pipe, clip, "fast", {})
    for name, s in list(SETTINGS.items())[1:]:
        got, _ = one_step_parts(latent_pipe, clip, "fast", s)
        assert (got["vdds"] - base["vdds"]).norm() > 1e-3 * base["vdds"].norm(), name


def test_pipeline_matches_the_cli_defaults(extending_folder):
    """fastdm-edit without options edits with EditConfig's defaults under the default model's measured ones (the
    bundled UNet's fastdm.json: lr 4.0 with S-SSM 6000); --preset paper with the paper's. A folder whose defaults
    carry a continuation rule: given too few steps to judge it, the rule is off and the report says why."""
    from fastdm.backbone import resolve_model
    from fastdm.cli import build_parser
    from fastdm.driver.config import PRESETS, EditConfig
    from fastdm.request import EditRequest, folder_defaults

    args = build_parser().parse_args(["in.gif", "--source-prompt", "a", "--target-prompt", "b"])
    measured = folder_defaults(resolve_model(None))[0]
    assert measured == {"lr": 4.0, "s_ssm_weight": 6000.0}
    assert EditRequest.from_args(args).config() == EditConfig("a", "b", **measured)
    # a model's continuation rule belongs to its own schedule: given too few steps to judge it, the edit runs them
    extending = folder_defaults(extending_folder)[0]
    assert extending["stop"] == "extend"
    few = EditRequest.from_args(build_parser().parse_args(["in.gif", "--source-prompt", "a", "--target-prompt", "b", "--steps", "3",
                                                           "--model", extending_folder]))
    assert few.config() == EditConfig("a", "b", **{**extending, "steps": 3, "stop": "steps"})
    assert few.settings_source["stop"] == "fastdm.json: extend off, 3 steps are too few to judge"
    args = build_parser().parse_args(["in.gif", "--source-prompt", "a", "--target-prompt", "b", "--preset", "paper", "--lr", "0.3"])
    got = EditRequest.from_args(args).config()
    assert got == EditConfig("a", "b", **{**PRESETS["paper"], "lr": 0.3})


def test_frames_must_be_uint8_video(pipe):
    with pytest.raises(FastDMError, match="uint8"):
        pipe(np.zeros((2, 16, 16, 3), np.float32), SRC, TGT, steps=1)


def test_fp16_model_keeps_the_structure_gradients(tiny_latent_model, clip, monkeypatch):
    """An fp16 model: S-SSM / T-SSM gradients (means over F x N x N similarities) would underflow in an
    fp16 backward; the step runs the losses on fp32 keys and backpropagates a power-of-two-scaled
    gradient. Same prompt for both, x 1e-2 from the source: the fp16 model's parts against fp32's.
    Measured (CPU): S-SSM 11 %, T-SSM 7 % off with the scaling; T-SSM 92 % off without it."""
    from fastdm.driver.step import DreamMotionStep

    def step(dtype, split=True):
        pipe = DreamMotionPipeline.from_pretrained(tiny_latent_model, dtype=dtype)
        run = pipe.prepare(clip, SRC, SRC, steps=1, seed=4, plan="fast", split_gradients=split, t_schedule="uniform")
        with torch.no_grad():
            run.x.add_(1e-2 * torch.randn(run.x.shape, generator=torch.Generator().manual_seed(7)))
        run.step()
        assert run.stepper.fp16_dropped == 0
        return run

    def parts(dtype):
        return {k: v.detach().float() for k, v in step(dtype).tensors(("grad_parts",))["grad_parts"].items()}

    want = parts("fp32")
    err = lambda got: {k: float((got[k] - want[k]).norm() / want[k].norm()) for k in ("s_ssm", "t_ssm")}
    scaled = err(parts("fp16"))
    assert max(scaled.values()) < 0.2, scaled
    # the edit's own path (no split): the weighted sum in one scaled backward, the same update as the parts give
    split, joint = step("fp16").x.grad, step("fp16", split=False).x.grad
    assert float((joint - split).norm() / split.norm()) < 1e-3
    monkeypatch.setattr(DreamMotionStep, "rescale_fp16", False)
    plain = err(parts("fp16"))
    assert plain["t_ssm"] > 0.5, plain  # the plain fp16 backward loses it: the scaling is what keeps it
