"""What an edit costs and when it stops: the evaluation counter, the paper preset, schedules, the
convergence rule, and the peers fastdm is measured against (SDEdit, FlowEdit) on exact denoisers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastdm import DreamMotionPipeline
from fastdm.driver.config import PRESETS, EditConfig
from fastdm.io.tensors import frames_to_tensor
from fastdm.driver.schedule import ConvergenceRule, draw_timestep, lr_factor, strata_order
from fastdm.losses import VDDSConfig
from fastdm.testing import PointMassBackbone

SRC, TGT = "a red circle moving right", "a blue circle moving right"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return DreamMotionPipeline.from_pretrained(tiny_model)


class _Count:
    """Counts the denoiser's forward batch elements at the backbone (independent of the step's own counter)."""

    def __init__(self, bb):
        self.bb, self.forward = bb, 0

    def __enter__(self):
        orig = type(self.bb).predict_noise

        def counted(bb_self, x_t, *a, **k):
            self.forward += x_t.shape[0]
            return orig(bb_self, x_t, *a, **k)

        self.bb.predict_noise = counted.__get__(self.bb)
        return self

    def __exit__(self, *exc):
        del self.bb.predict_noise


@pytest.mark.parametrize("plan,settings,per_step", [
    ("fast", {}, (4, 1)),  # grad branch 1 + three no-grad batched; one backward into the tapped prefix
    ("fast-seq", {}, (4, 1)),  # the three no-grad calls one at a time
    ("naive", {}, (4, 1)),  # all four in one batched call
    ("plain", {}, (4, 1)),
    ("fast", {"s_ssm_weight": 0.0, "t_ssm_weight": 0.0}, (4, 0)),  # V-DDS alone: no backward at all
])
def test_evaluation_counter_matches_a_hand_count(pipe, clip, plan, settings, per_step):
    steps = 3
    with _Count(pipe.backbone) as c:
        res = pipe(clip, SRC, TGT, steps=steps, plan=plan, **settings)
    ev = res.report["evaluations"]
    assert ev["forward"] == c.forward == steps * per_step[0]
    assert ev["backward"] == steps * per_step[1] and ev["setup_forward"] == 0


def test_counter_includes_the_automatic_mask_and_the_split_backward(pipe, clip):
    with _Count(pipe.backbone) as c:
        run = pipe.prepare(clip, SRC, TGT, mask="auto", steps=2, split_gradients=True)
        while not run.done:
            run.step()
    ev = run.evaluations
    calls = run.auto_mask.denoiser_calls
    assert calls >= 1 and ev["setup_forward"] == 2 * calls  # batch 2: the source under both prompts
    assert ev["forward"] == c.forward == 2 * 4 + 2 * calls
    assert ev["backward"] == 2 * 2  # split_gradients: S-SSM and T-SSM backpropagated apart


def test_paper_preset_is_the_paper_loop(pipe, clip):
    """--preset paper is exactly DreamMotion's loop: t ~ U[50, 950] and one noise per step from the seeded
    CPU generator, the step's gradient, plain SGD at lr 0.4, pixels clamped. Written out by hand here."""
    from fastdm.driver.plan import PLANS
    from fastdm.driver.step import DreamMotionStep
    from fastdm.losses import sample_timestep
    from fastdm.taps import resolve_layers

    steps = 4
    got = pipe(clip, SRC, TGT, preset="paper", steps=steps)
    assert got.report["config"]["t_schedule"] == "uniform" and got.report["config"]["lr"] == 0.4

    bb = pipe.backbone
    cfg = EditConfig(SRC, TGT, **{**PRESETS["paper"], "steps": steps})
    vcfg = VDDSConfig(cfg.guidance_scale, cfg.t_min, cfg.t_max, cfg.weighting)
    text = pipe.encode_prompts([TGT, "", SRC])
    x_src = bb.to_working(frames_to_tensor(clip))
    x = torch.nn.Parameter(x_src.clone())
    opt = torch.optim.SGD([x], lr=0.4)
    gen = torch.Generator("cpu").manual_seed(0)
    step = DreamMotionStep(bb, cfg, PLANS["fast"], vcfg, resolve_layers(bb, None), clip.shape[0], text, None)
    for _ in range(steps):
        t = sample_timestep(vcfg, gen)
        noise = torch.randn(x.shape, generator=gen)
        opt.zero_grad(set_to_none=True)
        step(x, x_src, t, noise)
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    assert torch.equal(got.working, x.detach())


def test_presets_and_their_overrides():
    from fastdm.driver.config import config_from_preset
    from fastdm.errors import BadInput

    paper = config_from_preset("paper", SRC, TGT)
    for k, v in PRESETS["paper"].items():
        assert getattr(paper, k) == v, k
    assert config_from_preset("paper", SRC, TGT, steps=20).steps == 20
    assert config_from_preset(None, SRC, TGT) == EditConfig(SRC, TGT)
    with pytest.raises(BadInput, match="unknown preset 'fastest'"):
        config_from_preset("fastest", SRC, TGT)
    # fingerprints of settings at their paper values are those of earlier releases (checkpoints, result caches)
    assert paper.fingerprint() == EditConfig(SRC, TGT, **PRESETS["paper"]).fingerprint()
    # ... checked against a committed run's: settings added since (soft_mask, ...) leave it as it was
    import json
    from pathlib import Path

    runs = Path(__file__).resolve().parent.parent / "benchmarks/results/quality-shapes-dit-cpu-intel-xeon-2-50ghz-2core-x86_64.runs.jsonl"
    rec = json.loads(runs.read_text().splitlines()[0])
    from fastdm.driver.config import _ADDED_DEFAULTS

    settings = {**_ADDED_DEFAULTS, **{k: v for k, v in rec["edit_config"].items() if k != "extra"}}  # (as it ran then)
    assert EditConfig(**settings).fingerprint() == rec["edit_fingerprint"]
    assert EditConfig(**{**settings, "soft_mask": 1.0}).fingerprint() != rec["edit_fingerprint"]
    with pytest.raises(BadInput, match="soft_mask"):
        EditConfig(SRC, TGT, soft_mask=-1.0).validate()


def test_timestep_schedules():
    cfg = VDDSConfig(t_min=50, t_max=950)
    gen = torch.Generator().manual_seed(0)
    n = 12
    anneal = [draw_timestep("anneal", k, n, cfg, gen) for k in range(n)]
    assert anneal == sorted(anneal, reverse=True) and anneal[0] > 875 and anneal[-1] < 125
    width = (cfg.t_max - cfg.t_min) / n
    for k, t in enumerate(anneal):  # each step inside its own stratum
        assert cfg.t_max - (k + 1) * width - 1 <= t <= cfg.t_max - k * width + 1
    order = strata_order(n, seed=0)
    strat = [draw_timestep("stratified", k, n, cfg, gen, order) for k in range(n)]
    strata = sorted(int((cfg.t_max - t) // width) for t in strat)
    assert strata == list(range(n)) and strat != sorted(strat, reverse=True)  # every stratum once, not in order
    assert lr_factor("constant", 5, 10) == 1.0
    cos = [lr_factor("cosine", k, 10) for k in range(10)]
    assert cos == sorted(cos, reverse=True) and cos[0] > 0.97 and 0 < cos[-1] < 0.03


def _trajectory(kind: str, n: int = 60) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 3, 2, 4, 4, generator=g)
    xs, x = [], torch.zeros_like(target)
    for k in range(n):
        if kind == "converging":  # geometric approach to the target, plus a little noise
            x = x + 0.25 * (target - x) + 1e-3 * torch.randn(x.shape, generator=g)
        elif kind == "moving":  # a steady drift that never settles (with noise of a third of its pace)
            x = x + 0.05 * target + 0.02 * torch.randn(x.shape, generator=g)
        elif kind == "slowing-but-moving":  # the pace halves once, then stays
            x = x + (0.1 if k < 20 else 0.05) * target
        xs.append(x.clone())
    return xs


@pytest.mark.parametrize("kind,stops", [("converging", True), ("moving", False), ("slowing-but-moving", False)])
def test_convergence_rule_on_toy_trajectories(kind, stops):
    rule = ConvergenceRule(window=6, tol=0.15)
    at = next((k + 1 for k, x in enumerate(_trajectory(kind)) if rule.update(x)), None)
    assert (at is not None) == stops, (kind, at, rule.progress[-5:])
    if stops:
        assert 12 <= at <= 40


def test_steps_auto_stops_a_converged_edit_and_runs_on_a_moving_one(pipe, clip):
    """On the tiny model: with a decaying learning rate the edit stops moving and the rule stops it early;
    at a constant rate on a random model it keeps moving and runs to the cap."""
    done = pipe(clip, SRC, TGT, steps=60, stop="converged", lr=0.4, t_schedule="uniform", lr_schedule="linear")
    stop = done.report["stop"]
    assert stop["converged"] and stop["stopped_at"] < 60 and done.report["steps_run"] == stop["stopped_at"]
    assert done.report["evaluations"]["forward"] == 4 * stop["stopped_at"]
    moving = pipe(clip, SRC, TGT, steps=30, stop="converged", lr=0.4, t_schedule="uniform", lr_schedule="constant")
    assert not moving.report["stop"]["converged"] and moving.report["steps_run"] == 30, moving.report["stop"]["progress"]


def test_cli_steps_auto_and_preset(tiny_model, clip_file, tmp_path):
    import json

    from fastdm.cli import main

    out = tmp_path / "o.gif"
    assert main([str(clip_file), "--model", tiny_model, "--source-prompt", SRC, "--target-prompt", TGT, "--steps", "auto",
                 "--max-steps", "5", "--preset", "paper", "--mask", "none", "--out", str(out), "--quiet", "--no-compare"]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["config"]["stop"] == "converged" and rep["config"]["steps"] == 5 and rep["config"]["lr"] == 0.4
    assert rep["evaluations"]["forward"] == 4 * rep["steps_run"]


def test_cli_stop_extend(tiny_model, clip_file, tmp_path, capsys):
    import json

    from fastdm.cli import main

    out = tmp_path / "o.gif"
    base = [str(clip_file), "--model", tiny_model, "--source-prompt", SRC, "--target-prompt", TGT, "--mask", "none",
            "--quiet", "--no-compare", "--steps", "8"]
    assert main(base + ["--stop", "extend", "--extend-max", "1", "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["config"]["stop"] == "extend" and rep["config"]["extend_max"] == 1 and rep["settings_source"]["stop"] == "given"
    assert rep["stop"]["extension"]["segments_run"] in (0, 1) and rep["steps_run"] == 8 + 4 * rep["stop"]["extension"]["segments_run"]
    assert rep["stop"]["cap"] == 12
    bad = tmp_path / "bad.gif"
    assert main(base[:-1] + ["auto", "--stop", "extend", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--steps auto" in err and "--stop extend" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
    assert main(base + ["--extend-max", "2", "--out", str(bad)]) == 2  # a cap of a rule not asked for
    err = capsys.readouterr().err
    assert "--extend-max" in err and "--stop extend" in err and not bad.exists()


def _clip_tensor(seed: int, lo: float = -0.4, hi: float = 0.4) -> tuple[np.ndarray, torch.Tensor]:
    """A random 2-frame 8x8 clip as uint8 frames and as the exact working tensor they decode to."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(round((lo + 1) * 127.5), round((hi + 1) * 127.5), (2, 8, 8, 3), dtype=np.uint8)
    return frames, frames_to_tensor(frames).permute(1, 0, 2, 3).unsqueeze(0).double()


def test_flowedit_with_exact_velocities_lands_on_the_known_edit():
    """Point-mass data per prompt: the guided velocity field of a prompt points at c_u + g (c - c_u), so
    FlowEdit's ODE from x_src = c_src ends at x_src + g (c_tar - c_src), whatever the noises."""
    from fastdm.sampling import flowedit

    clip, c_src = _clip_tensor(0)
    _, c_tar = _clip_tensor(1)
    _, c_u = _clip_tensor(2)
    bb = PointMassBackbone({"": c_u, "src": c_src, "tar": c_tar}, flow=True)
    g = 1.5
    want = (c_src + g * (c_tar - c_src)).clamp(-1, 1)
    want = ((want[0].permute(1, 2, 3, 0) + 1) * 127.5).round().numpy()
    for seed in (0, 1):
        out = flowedit(bb, clip, "src", "tar", steps=50, n_max=33, src_guidance=g, tar_guidance=g, seed=seed)
        assert np.abs(out.astype(np.float64) - want).max() <= 1.0
    # a plain-sampling tail (n_min) samples the target's own point mass from where the edit is
    out = flowedit(bb, clip, "src", "tar", steps=50, n_max=33, n_min=33, src_guidance=1.0, tar_guidance=1.0)
    want_tar = ((c_tar[0].permute(1, 2, 3, 0) + 1) * 127.5).round().numpy()
    assert np.abs(out.astype(np.float64) - want_tar).max() <= 1.0


def test_sdedit_with_an_exact_denoiser_lands_on_the_guided_target():
    from fastdm.sampling import ddim_video_to_video

    clip, c_src = _clip_tensor(0)
    _, c_tar = _clip_tensor(1)
    _, c_u = _clip_tensor(2)
    bb = PointMassBackbone({"": c_u, "tar": c_tar, "src": c_src})
    g = 1.5
    want = ((c_u + g * (c_tar - c_u)).clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5
    out = ddim_video_to_video(bb, clip, "tar", strength=0.6, steps=50, guidance_scale=g, seed=0)
    # the last DDIM step lands on t = 0, not on the data: ~3% of the noise is left
    assert np.abs(out.astype(np.float64) - want.numpy()).mean() < 0.03 * 127.5


def test_the_benchmarks_default_row_is_fastdm_edits_default():
    """benchmarks/cost.py names the schedule the defaults were chosen from; it must be what EditConfig runs."""
    from benchmarks.cost import DEFAULT_SCHEDULE, MODEL_DEFAULTS, SCHEDULES, candidate_settings
    from fastdm.backbone import resolve_model
    from fastdm.request import folder_defaults
    from fastdm.driver.config import resolve_config

    steps, settings = SCHEDULES[DEFAULT_SCHEDULE]
    assert EditConfig(SRC, TGT, steps=steps, **settings) == EditConfig(SRC, TGT)
    for model, name in MODEL_DEFAULTS.items():  # the bundled models: built-in defaults under their fastdm.json's
        steps, settings = candidate_settings(name)
        model_defaults, family_defaults, family = folder_defaults(resolve_model(model))
        config, source = resolve_config(None, SRC, TGT, {}, model_defaults=model_defaults, family_defaults=family_defaults,
                                        family=family)
        assert config == EditConfig(SRC, TGT, steps=steps, **settings), model
        assert source["lr"] == "fastdm.json"


def test_intervals_of_the_cost_tables():
    """Wilson's interval for a rate (5 of 10: 0.237-0.763, 0 of 21: 0-0.155) and a bootstrap interval of a mean."""
    from benchmarks.cost import bootstrap, wilson

    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    lo, hi = wilson(0, 21)
    assert lo == 0.0 and abs(hi - 0.1546) < 1e-4 and wilson(0, 0) is None
    lo, hi = bootstrap([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0 and bootstrap([2.0, 2.0]) == (2.0, 2.0)


def test_extension_segments_repeat_the_schedules_last_strata_at_halving_rates():
    from fastdm.driver.schedule import extension_lr_factor, extension_step, extension_timestep

    assert [extension_step(k, 12, 4) for k in (0, 11, 12, 15, 16, 23)] == [(0, 0), (0, 11), (1, 0), (1, 3), (2, 0), (3, 3)]
    cfg = VDDSConfig(7.5, 50, 950)
    gen = torch.Generator().manual_seed(0)
    width = (cfg.t_max - cfg.t_min) / 12
    for k in range(12, 24):
        t = extension_timestep(k, 12, 4, cfg, gen, span="low")
        stratum = 8 + (k - 12) % 4  # the schedule's last four strata, in its order
        assert cfg.t_max - (stratum + 1) * width - 1 <= t <= cfg.t_max - stratum * width + 1, (k, t)
        t = extension_timestep(k, 12, 4, cfg, gen)  # "full": the schedule restarted in four strata over the range
        stratum, wide = (k - 12) % 4, (cfg.t_max - cfg.t_min) / 4
        assert cfg.t_max - (stratum + 1) * wide - 1 <= t <= cfg.t_max - stratum * wide + 1, (k, t)
    first = [extension_lr_factor(k, 12, 4, 0.5) for k in range(12, 16)]
    assert first == pytest.approx([0.5 * lr_factor("cosine", i, 4) for i in range(4)])
    assert [extension_lr_factor(k, 12, 4, 0.5) for k in range(16, 20)] == pytest.approx([f / 2 for f in first])


def test_an_extended_edit_runs_its_segments_reports_them_and_resumes_bit_identically(pipe, clip, tmp_path):
    kw = dict(steps=4, stop="extend", extend_segment=2, extend_max=2, mask=None, seed=3)
    always = pipe(clip, SRC, TGT, extend_tol=0.0, **kw)  # every segment: the residual is above 0
    rep = always.report
    assert rep["steps_run"] == 8 and rep["stop"]["extension"]["segments_run"] == 2
    assert rep["stop"]["extension"]["why"] == "cap: 2 segment(s) run"
    assert rep["evaluations"]["forward"] == 4 * 8 and rep["evaluations"]["backward"] == 8
    never = pipe(clip, SRC, TGT, extend_tol=1e9, **kw)
    assert never.report["steps_run"] == 4 and never.report["stop"]["extension"]["segments_run"] == 0
    assert never.report["stop"]["extension"]["why"].startswith("settled: the last 2 steps moved the edit")
    plain = pipe(clip, SRC, TGT, steps=4, mask=None, seed=3)  # the schedule's own steps are the plain edit's
    assert np.array_equal(never.frames, plain.frames)

    class Killed(Exception):
        pass

    def kill(p, i, t, kwargs):
        if i == 6:  # in the second segment, after the step-6 checkpoint
            raise Killed
        return {}

    ck = str(tmp_path / "ck")
    with pytest.raises(Killed):
        pipe(clip, SRC, TGT, extend_tol=0.0, checkpoint_dir=ck, checkpoint_every=1, callback_on_step_end=kill, **kw)
    resumed = pipe(clip, SRC, TGT, extend_tol=0.0, checkpoint_dir=ck, resume=True, **kw)
    assert resumed.report["resumed_from_step"] == 6 and resumed.report["steps_run"] == 2
    assert np.array_equal(resumed.frames, always.frames)


def test_a_residual_rule_stops_a_real_edit_where_the_benchmark_simulation_reads_it(pipe, clip):
    """extend_on="vdds": the rule reads the masked V-DDS residual; a real edit continued by it runs exactly the steps
    (and ends at exactly the frames) that benchmarks/cost.py's simulation (run_extended + extended_rows) reads off one
    run forced to the cap: the default chosen from the simulated rows is what fastdm-edit runs."""
    import benchmarks.cost as cost
    from fastdm.driver.schedule import ExtensionRule

    case = {"id": "c", "kind": "colour", "source_prompt": SRC, "target_prompt": TGT}
    settings = dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine", extend_lr=0.5, extend_segment=2, extend_max=2)
    pipe_prepare = pipe.prepare
    pipe.prepare = lambda *a, **k: pipe_prepare(*a, **{**k, "mask": None})  # (the tiny model has no words to find)
    try:
        sim = cost.run_extended(pipe, case, clip, 4, settings, "x")
    finally:
        pipe.prepare = pipe_prepare
    at = {r["steps"]: r for r in sim}
    assert sorted(at) == [4, 6, 8]
    ratios = sorted(r["signals"]["vdds"] / r["signals"]["vdds_before"] for r in sim[:-1])
    for tol in (0.0, (ratios[0] + ratios[-1]) / 2 if ratios[0] < ratios[-1] else ratios[0], 1e9):
        k = next(k for k in sorted(at) if k == 8 or not ExtensionRule.continues(at[k]["signals"], tol, "vdds"))
        real = pipe(clip, SRC, TGT, mask=None, steps=4, seed=0, stop="extend", extend_on="vdds", extend_tol=tol, **settings)
        assert real.report["steps_run"] == k, tol
        assert np.array_equal(real.frames, at[k]["frames"])
        ext = real.report["stop"]["extension"]
        assert ext["on"] == "vdds" and (ext["why"].startswith("cap") if k == 8 else "masked V-DDS residual" in ext["why"])


def test_extension_settings_are_checked():
    from fastdm.errors import BadInput

    for bad, match in ((dict(extend_segment=0), "extend_segment"), (dict(extend_max=-1), "extend_max"),
                       (dict(extend_lr=0.0), "extend_lr"), (dict(extend_span="mid"), "extend_span"), (dict(extend_tol=-1.0), "extend_tol"),
                       (dict(extend_on="residual"), "extend_on"),
                       (dict(stop="extend", steps=7, extend_segment=4), "at most half of `steps=7`")):
        with pytest.raises(BadInput, match=match):
            EditConfig(SRC, TGT, **bad).validate()


def _run(method, case, kind, colour=True, shape=True, area=True, drift=0.5, evals=(50, 12), **extra):
    return {"method": method, "case": case, "kind": kind, "steps": 12, "seconds": 1.0, "model_hash": "h",
            "evaluations": {"forward": evals[0], "backward": evals[1]},
            "metrics": {"colour_ok": colour, "shape_ok": shape, "area_kept": area, "drift_px": drift, "background_change": 0.0,
                        "motion_fidelity": 1.0, "frame_consistency": 1.0}, **extra}


def test_the_rule_that_picks_the_default(tmp_path, monkeypatch):
    """ARCHITECTURE.md's rule on made-up tables: the cheapest candidate at the paper's success, area and drift (+0.1)
    within 83.5 evaluations; a continuation rule's rows read off the simulated segment ends; none qualifying: the
    fewest clips short."""
    import json

    import benchmarks.cost as cost

    monkeypatch.setattr(cost, "RESULTS", tmp_path)
    cases = [(f"c{i}", "colour") for i in range(4)] + [("s0", "shape")]
    runs = []
    for case, kind in cases:
        runs.append(_run("paper@200", case, kind, drift=0.5, evals=(802, 200)))
        runs.append(_run("cheap", case, kind, colour=case != "c0", drift=0.3))  # one colour edit short
        runs.append(_run("drifty", case, kind, drift=0.7))  # 0.2 px above the paper
        runs.append(_run("slow", case, kind, evals=(70, 16)))  # 86 evaluations
        runs.append(_run("good", case, kind, drift=0.55, evals=(66, 16)))
        # a continuation simulated to the cap: c0 is unfinished at 12 and done at 16; the rule must continue there
        sig_moving = {"speed": 1.0, "speed_before": 1.0, "vdds": 1.0, "vdds_before": 1.0}
        sig_settled = {"speed": 0.1, "speed_before": 1.0, "vdds": 0.5, "vdds_before": 1.0}
        for k in (12, 16, 20, 24):
            finished = case != "c0" or k >= 16
            runs.append(_run(f"extf-lr2.4-12@{k}", case, kind, colour=finished, drift=0.5, evals=(50 + 4 * (k - 12), k),
                             signals=sig_moving if (case == "c0" and k == 12) else sig_settled))
    for model in ("shapes", "shapes-dit"):
        (tmp_path / f"cost-{model}-choose-m.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    data, md = cost.decide("m")
    rows = {r["candidate"]: r for r in data["shapes"]["rows"]}
    assert not rows["cheap"]["qualifies"] and rows["cheap"]["why_not"] == ["colour 1 clip(s) short"]
    assert rows["cheap"]["paired_colour"] == [0, 1, 1.0] and rows["good"]["paired_area"] == [0, 0, 1.0]
    assert "| 0 / 1 (1.00) |" in md
    assert cost.mcnemar(1, 3) == 0.625 and cost.mcnemar(0, 6) == 2 / 64 and cost.mcnemar(7, 7) == 1.0
    assert not rows["drifty"]["qualifies"] and not rows["slow"]["qualifies"] and rows["good"]["qualifies"]
    ext = rows["extf-lr2.4-12+speed0.5"]  # continues c0 once (speed ratio 1 >= 0.5), stops the others at 12
    assert ext["qualifies"] and ext["evaluations"] == (4 * 62 + 82) / 5 and ext["worst"] == 82
    assert data["shapes"]["default"] == "extf-lr2.4-12+speed0.5" and "cheapest qualifying candidate): **extf-lr2.4-12+speed0.5**" in md
    # rule 9b: a present default that qualifies stays; one that does not is chosen again by rules 2-3
    monkeypatch.setattr(cost, "MODEL_DEFAULTS", {"shapes": "good", "shapes-dit": "drifty"})
    data, md = cost.decide("m")
    assert data["shapes"]["rule_9b"] == "good" and "(the present default, good, against the real paper): it qualifies and stays" in md
    assert data["shapes-dit"]["rule_9b"] == "extf-lr2.4-12+speed0.5"
    assert data["shapes-dit"]["fifth_round_pick"] == data["shapes-dit"]["widest_margin"] and "Rule 10c" in md
    assert "drifty, against the real paper): it does not qualify (drift 0.70 > 0.50 + 0.1); chosen again" in md
    # nothing qualifies without the continuation and "good": the fewest clips short within 83.5 evaluations (drift
    # and cost are not clips: "drifty" is none short, "slow" is over the cost)
    runs = [r for r in runs if not r["method"].startswith(("ext", "good", "drifty"))]
    for model in ("shapes", "shapes-dit"):
        (tmp_path / f"cost-{model}-choose-m.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    data, md = cost.decide("m")
    assert data["shapes"]["default"] == "cheap" and not data["shapes"]["qualified"] and "rule 4" in md


def test_the_third_rounds_pick_is_the_widest_margin_and_its_fresh_suite_is_named_apart(tmp_path, monkeypatch, capsys):
    """Rule 7c: among qualifying candidates the widest margin over the paper wins, not the cheapest; a report
    half's tables (fresh suite variant too) choose nothing; the fresh suite runs only once ARCHITECTURE.md names
    it, and only as a report half."""
    import json

    import benchmarks.cost as cost

    monkeypatch.setattr(cost, "RESULTS", tmp_path)
    cases = [(f"c{i}", "colour") for i in range(4)] + [("s0", "shape")]
    runs = []
    for case, kind in cases:
        runs.append(_run("paper@200", case, kind, colour=case != "c0", drift=0.5, evals=(802, 200)))
        runs.append(_run("tie", case, kind, colour=case != "c0", drift=0.4, evals=(50, 12)))  # cheapest, margin 0
        runs.append(_run("wide", case, kind, drift=0.55, evals=(66, 16)))  # finishes c0 too: margin +1
        runs.append(_run("wider-but-short", case, kind, area=case != "c1", evals=(50, 12)))  # +1 colour, -1 area
    for half in ("choose", "report", "report-v1", "report-v2"):
        for model in ("shapes", "shapes-dit"):
            (tmp_path / f"cost-{model}-{half}-m.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    data, md = cost.decide("m")
    rows = {r["candidate"]: r for r in data["shapes"]["rows"]}
    assert rows["tie"]["margin"] == 0 and rows["wide"]["margin"] == 1 and not rows["wider-but-short"]["qualifies"]
    assert data["shapes"]["default"] == "tie" and data["shapes"]["widest_margin"] == "wide"
    assert "Rule 7c (the third round's: the qualifying candidate with the widest margin, all rounds' candidates): **wide**" in md
    assert data["shapes"]["fourth_round_pick"] is None  # rule 8c: only the fourth round's own candidates
    monkeypatch.setattr(cost, "FOURTH_ROUND", frozenset({"tie", "wide", "wider-but-short"}))
    data, md = cost.decide("m")
    assert data["shapes"]["fourth_round_pick"] == "wide" and "Fourth round's pick" in md and "**wide** (+1)" in md
    monkeypatch.setattr(cost, "FOURTH_ROUND", frozenset({"tie"}))  # qualifies, but no margin: the round ends
    data, md = cost.decide("m")
    assert data["shapes"]["fourth_round_pick"] is None and "the round ends on the choose half" in md
    data, md = cost.decide("m", half="report-v1")
    assert data["shapes"]["default"] is None and "--half report --variant 1" in md and "chooses nothing" in md
    data, md = cost.decide("m", half="report-pooled")  # both report suites as one table: the clips named apart
    rows = {r["candidate"]: r for r in data["shapes"]["rows"]}
    assert rows["wide"]["margin"] == 2 and data["shapes"]["default"] is None and "--pooled" in md and "not a third one" in md
    data, md = cost.decide("m", half="report-pooled-all")  # rule 8f: all three report suites
    rows = {r["candidate"]: r for r in data["shapes"]["rows"]}
    assert rows["wide"]["margin"] == 3 and rows["wide"]["qualifies"] and "15 clips" in md and "rules 8f and 9b" in md
    data, md = cost.decide("m", half="report-pooled-4")  # rule 10e: four suites; the fourth not run yet: no verdict
    assert data["shapes"]["reference"] is None and "No verdict: no runs of this model on report-v3 yet" in md
    for model in ("shapes", "shapes-dit"):
        (tmp_path / f"cost-{model}-report-v3-m.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    data, md = cost.decide("m", half="report-pooled-4")
    rows = {r["candidate"]: r for r in data["shapes"]["rows"]}
    assert rows["wide"]["margin"] == 4 and "20 clips" in md and "rule 10e" in md
    assert cost.split_name("shapes-dit-report-v1") == ("shapes-dit", "report", 1)
    assert cost.split_name("shapes-choose") == ("shapes", "choose", 0) and cost.split_name("shapes") == ("shapes", None, 0)
    with pytest.raises(SystemExit):  # a fresh suite is a report half only
        cost.main(["--half", "choose", "--variant", "1"])
    assert "give it with --half report" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cost.main(["--pooled"])
    assert "--pooled goes with --decide" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not pre-registered"):
        cost.main(["--half", "report", "--variant", "99", "--methods", "paper"])
    assert all(rule in (Path(cost.__file__).parent.parent / "ARCHITECTURE.md").read_text() for rule in cost.FRESH_SUITE_RULE.values())
    assert cost.FRESH_SUITE_RULE[1] in (Path(cost.__file__).parent.parent / "ARCHITECTURE.md").read_text()


def test_extension_rule_decisions_and_reasons():
    """Continue while the last segment moved at least tol x as fast as the one before; nothing before: only if it
    moves now; the report's reason (cap, settled, cut short) and planned never past the cap."""
    from fastdm.driver.schedule import ExtensionRule

    assert ExtensionRule.continues({"speed": 1.0, "speed_before": 1.0}, 1.0)
    assert not ExtensionRule.continues({"speed": 0.5, "speed_before": 1.0}, 0.75)
    assert ExtensionRule.continues({"speed": 0.1, "speed_before": 0.0}, 1.0)
    assert not ExtensionRule.continues({"speed": 0.0, "speed_before": 0.0}, 1.0)
    rule = ExtensionRule(steps=4, segment=2, max_segments=2, tol=1.0)
    for k in range(4):  # the schedule: steps moving at a steady pace
        rule.observe(t=900 - 200 * k, vdds=1.0, moved=1.0, lr=1.0)
    assert rule.planned == 6  # steady: continue
    assert rule.report()["why"] == "cut short (a callback stopped it)"  # (stopped here, where the rule continued)
    for k in range(2):
        rule.observe(t=500, vdds=1.0, moved=0.2, lr=1.0)  # slowed to a fifth
    assert rule.planned == 6 and rule.report()["why"].startswith("settled: the last 2 steps moved the edit 0.20x")
    fast = ExtensionRule(steps=4, segment=2, max_segments=2, tol=0.0)
    for k in range(8):
        fast.observe(t=500, vdds=1.0, moved=1.0, lr=1.0)
    assert fast.planned == fast.cap == 8 and fast.report()["why"] == "cap: 2 segment(s) run"


def test_area_trace_records_every_step_of_each_value(monkeypatch, capsys, tmp_path):
    """benchmarks/area_trace.py: one run per value of the varied setting, a row per step (area ratio, frames at the
    target, solid frames), the end's metrics; --tag names the files apart, --png writes the source's and each run's
    last frames; an unknown case is one line."""
    import imageio.v3 as iio

    import benchmarks.area_trace as at

    monkeypatch.setattr(at, "RESULTS", tmp_path)
    written = {}
    monkeypatch.setattr(at, "write_results", lambda stem, data, md: written.update(stem=stem, data=data, md=md))
    at.main(["--case", "colour-red-triangle-to-blue-triangle", "--set", "steps=2", "--set", "soft_mask=0,1"])
    runs = written["data"]["runs"]
    assert [r["settings"]["soft_mask"] for r in runs] == [0.0, 1.0] and all(r["settings"]["steps"] == 2 for r in runs)
    for r in runs:
        assert [s["step"] for s in r["steps"]] == [1, 2] and all(s["area_ratio"] > 0 and 0 <= s["target_frames"] <= 8
                                                                 for s in r["steps"])
        assert set(r["final"]) >= {"colour_ok", "area_kept", "drift_px"}
    assert written["stem"].startswith("area-trace-colour-red-triangle-to-blue-triangle-") and written["md"].count("| 2 |") == 2
    assert all(0 < s["fill_ratio"] <= 1.1 and 0 <= s["target_shape_frames"] <= 8 for r in runs for s in r["steps"])
    assert all(0 <= s["solid_frames"] <= 8 for r in runs for s in r["steps"]) and "shape_solid_ok" in runs[0]["final"]
    with pytest.raises(SystemExit, match="--tag '../x'"):
        at.main(["--case", "colour-red-triangle-to-blue-triangle", "--tag", "../x"])
    at.main(["--case", "shape-yellow-square-to-yellow-circle", "--model", "shapes-dit", "--variant", "3", "--set", "steps=2",
             "--tag", "default", "--png"])
    assert written["stem"].startswith("area-trace-shape-yellow-square-to-yellow-circle-shapes-dit-v3-default-")
    (png,) = tmp_path.glob("*.png")
    assert png.name == written["stem"] + ".png" and iio.imread(png).shape == (2 * 32 * 4, 8 * 32 * 4, 3)
    assert "frames" not in written["data"]["runs"][0] and png.name in written["md"]
    assert "--model shapes-dit --variant 3" in written["md"] and written["data"]["model"] == "shapes-dit"
    with pytest.raises(SystemExit, match="no case 'nope'"):
        at.main(["--case", "nope"])
    for bad, why in (("lr=fast", "'fast' is not a float"), ("no_such=1", "expected FIELD=VALUE")):
        with pytest.raises(SystemExit, match=why):
            at.main(["--case", "colour-red-triangle-to-blue-triangle", "--set", bad])


def test_a_candidate_is_the_built_in_defaults_plus_its_settings_whatever_the_folder_says(monkeypatch):
    """Rule 9d: the bundled UNet's fastdm.json (lr 4.0, S-SSM 6000), nor a folder that says stop=extend (the UNet's
    before rule 11), leaks into a candidate schedule: a candidate runs EditConfig's built-ins plus its own settings
    (the built-in S-SSM 3000 and stop=steps where it names neither); a simulated continuation keeps its own rule."""
    import benchmarks.cost as cost
    from fastdm import DreamMotionPipeline
    from fastdm.toyworld.suite import build_full_suite, render_case

    pipe = DreamMotionPipeline.from_pretrained()
    assert pipe.backbone.settings["defaults"]["s_ssm_weight"] == 6000.0  # (what would leak)
    case = build_full_suite()[0]
    seen = []

    def prepare(*a, **k):
        seen.append(pipe.__class__.prepare(pipe, *a, **k).config)
        raise StopIteration

    pipe.prepare = prepare
    from tests.conftest import EXTENDING_DEFAULTS

    for folder in (pipe.backbone.settings["defaults"], {**EXTENDING_DEFAULTS, "s_ssm_weight": 6000.0}):
        monkeypatch.setitem(pipe.backbone.settings, "defaults", folder)
        for name in ("sgd-anneal-cos-lr4.0-s2x-12", "sgd-anneal-cos-lr3.6-soft1-16"):
            steps, settings = cost.SCHEDULES[name]
            with pytest.raises(StopIteration):
                cost.run_schedule(pipe, case, render_case(case), steps, settings, name)
            assert seen[-1] == EditConfig(case["source_prompt"], case["target_prompt"], steps=steps, **settings), name
            assert seen[-1].stop == "steps" and (name != "sgd-anneal-cos-lr3.6-soft1-16" or seen[-1].s_ssm_weight == 3000.0)
    with pytest.raises(StopIteration):
        cost.run_extended(pipe, case, render_case(case), *cost.EXTENDED["extf-lr2.4-8"], "extf-lr2.4-8")
    steps, settings = cost.candidate_settings("extf-lr2.4-8+vdds1.1")
    assert seen[-1] == EditConfig(case["source_prompt"], case["target_prompt"], steps=steps,
                                  **{**settings, "extend_on": "speed", "extend_tol": 1.0})  # (forced: the rule is read later)


def test_the_paper_reference_runs_the_papers_schedule_whatever_the_folder_says():
    """Rule 9: run_paper asks for preset "paper", so the bundled UNet's fastdm.json (lr 4.0, S-SSM 6000; earlier lr 3.6,
    soft_mask 1) and EditConfig's annealed cosine defaults do not leak into the reference; DDS is the same with the SSM
    losses off."""
    import benchmarks.cost as cost
    from fastdm import DreamMotionPipeline
    from fastdm.driver.config import PRESETS
    from fastdm.toyworld.suite import build_full_suite, render_case

    pipe = DreamMotionPipeline.from_pretrained()
    case = build_full_suite()[0]
    seen = []

    def prepare(*a, **k):
        seen.append(cost.schedule_of(pipe.__class__.prepare(pipe, *a, **k).config.to_dict()))
        raise StopIteration

    pipe.prepare = prepare
    for kw in ({}, dict(snapshots=(25, 200), method="dds", s_ssm_weight=0.0, t_ssm_weight=0.0)):
        with pytest.raises(StopIteration):
            cost.run_paper(pipe, case, render_case(case), **kw)
    paper = {k: v for k, v in PRESETS["paper"].items() if k in cost.SCHEDULE_KEYS}
    weights = ("s_ssm_weight", "t_ssm_weight")
    assert all(s[k] == v for s in seen for k, v in paper.items() if k not in weights), seen
    assert (seen[0]["s_ssm_weight"], seen[0]["t_ssm_weight"]) == (3000.0, 1000.0)  # (not the folder's 6000)
    assert seen[1]["s_ssm_weight"] == seen[1]["t_ssm_weight"] == 0


def test_decide_gives_no_verdict_without_the_whole_paper_reference(tmp_path, monkeypatch):
    import json

    import benchmarks.cost as cost

    monkeypatch.setattr(cost, "RESULTS", tmp_path)
    runs = [_run("anneal200@200", "c0", "colour"), _run("cheap", "c0", "colour"), _run("cheap", "c1", "colour"),
            _run("paper@200", "c1", "colour")]
    for model in ("shapes", "shapes-dit"):
        (tmp_path / f"cost-{model}-report-v2-m.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    data, md = cost.decide("m", half="report-v2")
    assert data["shapes"]["reference"] is None and data["shapes"]["reference_clips"] == 1
    assert "No verdict: `paper@200` has run on 1 of these 2 clips" in md


def test_the_seventh_rounds_suites_read_shape_success_on_solid_frames_only(tmp_path, monkeypatch):
    """Rule 12: on variants 4 and 5 (and the two pooled) a shape edit counts by ``shape_solid_ok``; elsewhere by the
    fill-ratio reading of rules 1-11. A paper whose shape edits are speckle read as the target shape (``shape_ok``
    but not ``shape_solid_ok``) no longer out-counts a default that makes none; the tables show both readings."""
    import json

    import benchmarks.cost as cost

    monkeypatch.setattr(cost, "RESULTS", tmp_path)
    assert cost.shape_key("report-v4") == cost.shape_key("report-pooled-fresh") == "shape_solid_ok"
    assert cost.shape_key("report-v3") == cost.shape_key("choose") == cost.shape_key(None) == "shape_ok"
    assert set(cost.POOLED_ROLE) == set(cost.POOLED)  # every pooled table says what it is for

    def run(method, case, kind, shape, solid_shape, evals=(50, 12)):
        r = _run(method, case, kind, shape=shape, evals=evals)
        r["metrics"].update(shape_solid_ok=solid_shape, solid_frames=1.0 if solid_shape else 0.0)
        return r

    for variant in (4, 5):
        runs = [run("paper@200", f"c{variant}", "colour", False, False, (802, 200)),
                run("paper@200", f"s{variant}", "shape", True, False, (802, 200)),  # a speckled "success"
                run("default", f"c{variant}", "colour", False, False), run("default", f"s{variant}", "shape", False, False)]
        for model in ("shapes", "shapes-dit"):
            (tmp_path / f"cost-{model}-report-v{variant}-m.runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    data, md = cost.decide("m", half="report-pooled-fresh")
    row = {r["candidate"]: r for r in data["shapes-dit"]["rows"]}["default"]
    assert row["qualifies"] and data["shapes-dit"]["reference"]["shape_success"] == 0.0
    assert "two fresh suites of rule 12 pooled" in md
    # the same runs read as rules 1-11 read them: one shape edit short on each suite
    for variant in (4, 5):
        src = tmp_path / f"cost-shapes-dit-report-v{variant}-m.runs.jsonl"
        src.rename(tmp_path / f"cost-shapes-dit-report-v{variant - 2}-m.runs.jsonl")
    data, _ = cost.decide("m", half="report-v2")
    assert {r["candidate"]: r for r in data["shapes-dit"]["rows"]}["default"]["why_not"] == ["shape 1 clip(s) short"]
    table = cost.summarize([run("m", "s", "shape", True, False), run("m", "t", "shape", True, True)], "shape_solid_ok")["m"]
    assert (table["shape_success"], table["shape_success_fill_only"], table["solid_frames"]) == (0.5, 1.0, 0.5)
    md = cost.markdown("t", {"m": table}, {"machine": "m", "machine_description": "d", "model": "x", "denoiser": "unet",
                                           "model_hash": "h", "cases": 2, "command": "c"}, "note")
    assert "| shape success (fill ratio alone) | solid frames |" in md and "| 50% [9%, 91%] | 100% | 50% |" in md
    # a rule-12 suite's own tables read it the same way; other suites' tables keep their columns
    written = {}
    monkeypatch.setattr(cost, "write_results", lambda stem, data, md: written.update({stem: (data, md)}))
    runs = [run("m", "s", "shape", True, False), run("m", "t", "shape", True, True)]
    done = {(r["method"], r["case"], "h"): r for r in runs}
    for name, solid_reading in (("shapes-dit-report-v4", True), ("shapes-dit-report-v3", False)):
        cost.write_tables(done, [{"id": "s"}, {"id": "t"}], name, "x", "unet", "h", "m")
        data, md = written[f"cost-{name}-m"]
        assert data["summary"]["m"]["shape_success"] == (0.5 if solid_reading else 1.0)
        assert ("solid frames" in md) == solid_reading


def test_eighth_round_pick_needs_both_design_pools():
    """Rule 13c: a candidate must qualify on both pooled design tables; the widest summed margin wins, ties by cost then
    drift; no pick until every candidate has run on both; none qualifying on both ends the round."""
    import benchmarks.cost as cost

    a, b, c = cost.EIGHTH_ROUND[:3]

    def row(name, qualifies, margin, drift=0.5, ev=62.0, shape=(0, 0)):
        return {"candidate": name, "qualifies": qualifies, "margin": margin, "why_not": [] if qualifies else ["area 1 clip(s) short"],
                "evaluations": ev, "worst": 62, "drift": drift, "counts": {"colour": 0, "shape": shape[0], "area": 0},
                "reference_counts": {"colour": 0, "shape": shape[1], "area": 0}}

    def tables(first, second):
        return {"report-pooled-4": {"shapes-dit": {"rows": first}}, "report-pooled-fresh": {"shapes-dit": {"rows": second}}}

    rest = [row(n, False, -3) for n in cost.EIGHTH_ROUND[3:]]
    # a: the widest margin on one pool, but fails the other; b and c qualify on both, c wider summed
    data, md = cost.eighth_round("m", tables([row(a, True, 9), row(b, True, 1), row(c, True, 2), *rest],
                                             [row(a, False, 5), row(b, True, 3), row(c, True, 3), *rest]))
    assert data["complete"] and data["pick"] == c and f"**{c}**" in md
    assert {r["candidate"]: r["margin"] for r in data["rows"]}[c] == 5
    # a tie on the summed margin goes to the lower drift (rule 3's order after cost)
    data, _ = cost.eighth_round("m", tables([row(b, True, 2, drift=0.6), row(c, True, 2, drift=0.4), row(a, False, 0), *rest],
                                            [row(b, True, 3), row(c, True, 3), row(a, False, 0), *rest]))
    assert data["pick"] == c
    # none qualifying on both: the round ends
    data, md = cost.eighth_round("m", tables([row(n, True, 1) for n in cost.EIGHTH_ROUND],
                                             [row(n, False, 1) for n in cost.EIGHTH_ROUND]))
    assert data["pick"] is None and "the round ends" in md
    # on variants 0-3 a fill-ratio shape shortfall neither fails a candidate nor counts in its margin (13c's amendment)
    short = {**row(b, False, -1, shape=(8, 11)), "why_not": ["shape 3 clip(s) short"]}
    data, _ = cost.eighth_round("m", tables([short, row(c, True, 1), row(a, False, 0), *rest],
                                            [row(b, True, 1), row(c, True, 1), row(a, False, 0), *rest]))
    rows = {r["candidate"]: r for r in data["rows"]}
    assert rows[b]["qualifies"] and rows[b]["margins"] == [2, 1] and data["pick"] == b
    # but not on variants 4-5, where shape is read on solid frames
    data, _ = cost.eighth_round("m", tables([row(b, True, 2), row(c, True, 1), row(a, False, 0), *rest],
                                            [{**row(b, False, 0), "why_not": ["shape 1 clip(s) short"]}, row(c, True, 1),
                                             row(a, False, 0), *rest]))
    assert data["pick"] == c
    # a fill-ratio shape shortfall on variants 0-3 does not excuse an area shortfall there
    both = {**row(b, False, -2, shape=(8, 11)), "why_not": ["shape 3 clip(s) short", "area 1 clip(s) short"]}
    data, _ = cost.eighth_round("m", tables([both, row(c, True, 1), row(a, False, 0), *rest],
                                            [row(b, True, 5), row(c, True, 1), row(a, False, 0), *rest]))
    assert not {r["candidate"]: r for r in data["rows"]}[b]["qualifies"] and data["pick"] == c
    # a tie on the summed margin goes to the cheaper candidate before the drift
    data, _ = cost.eighth_round("m", tables([row(b, True, 2, drift=0.3, ev=82.0), row(c, True, 2, drift=0.6), row(a, False, 0), *rest],
                                            [row(b, True, 3, ev=82.0), row(c, True, 3), row(a, False, 0), *rest]))
    assert data["pick"] == c
    # a candidate missing from one pool: no pick yet, whatever the others say
    data, md = cost.eighth_round("m", tables([row(n, True, 1) for n in cost.EIGHTH_ROUND],
                                             [row(n, True, 1) for n in cost.EIGHTH_ROUND[1:]]))
    assert not data["complete"] and data["pick"] is None and "no pick" in md
