"""Edit quality against cost: schedules, budgets, the stopping rule and the peers, on both bundled models.

Every method edits the same held-out clips (``build_suite(seed=1)``: 10 generated cases, 4 colour, 3
shape, 3 both; the quality suite uses seed 0), with fastdm-edit's defaults otherwise (automatic mask,
S-SSM/T-SSM weights, guidance 7.5, seed 0), scored with the quality suite's metrics
(``benchmarks/quality.py``: colour/shape success, centroid drift, object area kept, background
change, motion fidelity, frame consistency), and costed by the denoiser evaluations it made (forward
batch elements and backward passes, counted at the call sites: the pipeline's own counter for
fastdm, a counting wrapper around ``predict_noise`` for the peers) and its seconds.

Methods:

* ``paper``: SGD lr 0.4, t ~ U[50, 950], 200 steps (``--preset paper``). One 200-step run per case is
  scored at 12, 16, 25, 50, 100 and 200 steps (the run to step k *is* a k-step edit: t, noise and the
  constant learning rate do not depend on the step count), and at the step where each stopping rule
  of ``STOP_RULES`` would have stopped it (the rule only observes the run until it stops it);
* schedules of :data:`SCHEDULES` (``--schedules``), each a full edit at its own step count;
* peers: ``dds`` (V-DDS alone, 200 steps: fastdm's ``vdds_only``), ``sdedit-S`` (noise the source to
  strength S of 50 DDIM steps, sample with the target prompt), ``flowedit`` (flow-matching models
  only: T 50, n_max 33, n_avg 1, guidance 3.5 source / 13.5 target as published for SD3; no mask, as
  published).

Runs are cached one line each in ``results/cost-<model>-<machine>.runs.jsonl``; the tables
``results/cost-<model>-<machine>.{json,md}`` and ``results/peers-<model>-<machine>.{json,md}`` are
rewritten from the cache after every run.

    python -m benchmarks.cost --model shapes --methods paper,sgd-anneal-12 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, denoiser_hash, machine_description, machine_name, repo_relative, runs_machines, write_results
from benchmarks.suite import frames_of, over_builtins
from fastdm.toyworld.suite import HALVES, build_full_suite, build_suite, render_case, score, suite_half

SNAPSHOTS = (12, 16, 25, 50, 100, 200)
# (window, tol) of the convergence rule, observed on every paper run; the first is --steps auto's default
STOP_RULES = ((6, 0.15), (6, 0.25), (8, 0.1), (4, 0.2))
# name -> (steps, EditConfig settings): fastdm schedules tried against the paper's
SCHEDULES = {
    "sgd-anneal-12": (12, dict(t_schedule="anneal")),
    "sgd-anneal-lr0.8-12": (12, dict(t_schedule="anneal", lr=0.8)),
    "sgd-lr0.8-12": (12, dict(lr=0.8)),
    "sgd-anneal-lr0.8-16": (16, dict(t_schedule="anneal", lr=0.8)),
    "sgd-strat-lr0.8-12": (12, dict(t_schedule="stratified", lr=0.8)),
    "momentum-anneal-12": (12, dict(t_schedule="anneal", lr=0.1, momentum=0.9)),
    "momentum-anneal-cos-12": (12, dict(t_schedule="anneal", lr=0.16, momentum=0.9, lr_schedule="cosine")),
    "adam-anneal-cos-12": (12, dict(t_schedule="anneal", optimizer="adam", lr=0.2, lr_schedule="cosine")),
    "adam-cos-12": (12, dict(optimizer="adam", lr=0.2, lr_schedule="cosine")),
    "sgd-anneal-lr1.2-12": (12, dict(t_schedule="anneal", lr=1.2)),
    "sgd-anneal-cos-lr1.6-12": (12, dict(t_schedule="anneal", lr=1.6, lr_schedule="cosine")),
    "sgd-anneal-cos-lr1.2-12": (12, dict(t_schedule="anneal", lr=1.2, lr_schedule="cosine")),
    "momentum-anneal-cos-lr0.24-12": (12, dict(t_schedule="anneal", lr=0.24, momentum=0.9, lr_schedule="cosine")),
    "sgd-anneal-cos-lr1.0-12": (12, dict(t_schedule="anneal", lr=1.0, lr_schedule="cosine")),
    "sgd-anneal-cos-lr0.8-12": (12, dict(t_schedule="anneal", lr=0.8, lr_schedule="cosine")),
    "sgd-anneal-cos-lr1.2-16": (16, dict(t_schedule="anneal", lr=1.2, lr_schedule="cosine")),
    "momentum0.5-anneal-cos-lr0.6-12": (12, dict(t_schedule="anneal", lr=0.6, momentum=0.5, lr_schedule="cosine")),
    "momentum-anneal-linear-lr0.12-12": (12, dict(t_schedule="anneal", lr=0.12, momentum=0.9, lr_schedule="linear")),
    "momentum-anneal-lr0.12-12": (12, dict(t_schedule="anneal", lr=0.12, momentum=0.9)),
    "momentum-anneal-16": (16, dict(t_schedule="anneal", lr=0.1, momentum=0.9)),
    "sgd-anneal-lr0.8-25": (25, dict(t_schedule="anneal", lr=0.8)),
    "momentum-cos-12": (12, dict(lr=0.16, momentum=0.9, lr_schedule="cosine")),
    "momentum-anneal-cos-16": (16, dict(t_schedule="anneal", lr=0.12, momentum=0.9, lr_schedule="cosine")),
    # issue #30, tried on the full suite's choose half
    "sgd-anneal-cos-lr2.4-12": (12, dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine")),
    "sgd-anneal-cos-lr0.8-g15-12": (12, dict(t_schedule="anneal", lr=0.8, lr_schedule="cosine", guidance_scale=15.0)),
    "sgd-anneal-cos-lr1.6-16": (16, dict(t_schedule="anneal", lr=1.6, lr_schedule="cosine")),
    "sgd-anneal-cos-lr3.2-12": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine")),
    "sgd-anneal-cos-lr2.4-16": (16, dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine")),
    "sgd-anneal-cos-lr3.6-12": (12, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine")),
    "sgd-anneal-cos-lr4.0-12": (12, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine")),
    "sgd-anneal-cos-lr4.8-12": (12, dict(t_schedule="anneal", lr=4.8, lr_schedule="cosine")),
    # issue #30, second round (ARCHITECTURE rule 6), choose half: more lr with a stronger S-SSM to keep the area
    # (lr >= 3.6 lost it at the default weight), and the 16 steps the evaluation cap allows
    "sgd-anneal-cos-lr3.2-16": (16, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine")),
    # rule 10b (the fifth round, the transformer): the S-SSM at twice its weight at the transformer's lr
    "sgd-anneal-cos-lr3.2-s2x-12": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", s_ssm_weight=6000.0)),
    "sgd-anneal-cos-lr3.6-s2x-12": (12, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine", s_ssm_weight=6000.0)),
    "sgd-anneal-cos-lr4.0-s2x-12": (12, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine", s_ssm_weight=6000.0)),
    "sgd-anneal-cos-lr4.0-s4x-12": (12, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine", s_ssm_weight=12000.0)),
    "sgd-anneal-cos-lr4.8-s2x-12": (12, dict(t_schedule="anneal", lr=4.8, lr_schedule="cosine", s_ssm_weight=6000.0)),
    # issue #30, third round (ARCHITECTURE rule 7), choose half: on it a 2x S-SSM weight at lr 4.0-4.8 finished the two
    # blue edits the paper does not (blue -> magenta, blue -> cyan) but lost a shape edit and a colour edit at 12 steps;
    # the 16 steps the cap allows, and 1.5x between
    "sgd-anneal-cos-lr4.0-s2x-16": (16, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine", s_ssm_weight=6000.0)),
    "sgd-anneal-cos-lr3.6-s2x-16": (16, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine", s_ssm_weight=6000.0)),
    "sgd-anneal-cos-lr3.6-s1.5x-16": (16, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine", s_ssm_weight=4500.0)),
    "sgd-anneal-cos-lr4.0-s1.5x-16": (16, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine", s_ssm_weight=4500.0)),
    "sgd-anneal-cos-lr3.2-s1.5x-16": (16, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", s_ssm_weight=4500.0)),
    "sgd-anneal-cos-lr4.8-s2x-16": (16, dict(t_schedule="anneal", lr=4.8, lr_schedule="cosine", s_ssm_weight=6000.0)),
    # (a stronger S-SSM lost the shape edit green circle -> square at every lr above: between lr 3.2 and 4.0 at the
    # default weight, and a stronger guidance instead of a larger step)
    "sgd-anneal-cos-lr3.6-16": (16, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine")),
    "sgd-anneal-cos-lr3.2-g10-16": (16, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", guidance_scale=10.0)),
    # issue #30, fourth round (ARCHITECTURE rule 8), choose half: a method change. At lr >= 3.6 the first high-t steps
    # paint the target colour into the whole automatic mask (red -> blue: the object 2.75x its area after two steps,
    # still 2.1x at the end); the mask graded by its own cross-attention map (EditConfig.soft_mask) keeps the halo down
    "sgd-anneal-cos-lr3.2-soft1-16": (16, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", soft_mask=1.0)),
    "sgd-anneal-cos-lr3.6-soft1-16": (16, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine", soft_mask=1.0)),
    "sgd-anneal-cos-lr4.0-soft1-16": (16, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine", soft_mask=1.0)),
    "sgd-anneal-cos-lr4.0-soft2-16": (16, dict(t_schedule="anneal", lr=4.0, lr_schedule="cosine", soft_mask=2.0)),
    # (lr 4.0 at power 1 lost red -> blue's area as lr 3.6 without the grading did; at power 2 too: lr 3.6 at power 2)
    "sgd-anneal-cos-lr3.6-soft2-16": (16, dict(t_schedule="anneal", lr=3.6, lr_schedule="cosine", soft_mask=2.0)),
    # issue #30, eighth round (ARCHITECTURE rule 13), the transformer: its default loses objects' area to a speckled halo
    # around small triangles and to speckled squares coming apart (rule 12f); the graded mask keeps the halo's update
    # down, a lower lr or a stronger S-SSM hold the object together, a higher t floor skips the low-t steps that bring
    # the speckle. 12 steps each (62 evaluations).
    "sgd-anneal-cos-lr3.2-soft1-12": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", soft_mask=1.0)),
    "sgd-anneal-cos-lr3.2-soft2-12": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", soft_mask=2.0)),
    "sgd-anneal-cos-lr2.4-soft1-12": (12, dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine", soft_mask=1.0)),
    "sgd-anneal-cos-lr3.2-s2x-soft1-12": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", s_ssm_weight=6000.0,
                                                   soft_mask=1.0)),
    "sgd-anneal-cos-lr3.2-soft1-t200-12": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", soft_mask=1.0, t_min=200)),
}
# rule 13a: the eighth round's candidates (the transformer)
EIGHTH_ROUND = ("sgd-anneal-cos-lr3.2-soft1-12", "sgd-anneal-cos-lr3.2-soft2-12", "sgd-anneal-cos-lr2.4-soft1-12",
                "sgd-anneal-cos-lr3.2-s2x-soft1-12", "sgd-anneal-cos-lr3.2-soft1-t200-12", "sgd-anneal-cos-lr2.4-12",
                "sgd-anneal-cos-lr3.2-s2x-12")
PEERS = ("dds", "sdedit-0.5", "sdedit-0.7", "flowedit")
DEFAULT_SCHEDULE = "sgd-anneal-cos-lr0.8-12"  # EditConfig's built-in defaults: models without measured defaults (tested)
# what fastdm-edit runs on each bundled model by default: the built-in defaults under the folder's fastdm.json
# defaults, picked by ARCHITECTURE.md's rules (tested)
# (UNet: rule 11, the widest margin, passed on a fresh suite; transformer: rule 13, picked on the spent report suites,
# passed on two fresh ones)
MODEL_DEFAULTS = {"shapes": "sgd-anneal-cos-lr4.0-s2x-12", "shapes-dit": "sgd-anneal-cos-lr3.2-s2x-soft1-12"}
METRICS = ("colour_ok", "shape_ok", "drift_px", "area_kept", "background_change", "motion_fidelity", "frame_consistency")


RULE_HEADING = "## The rule that picks the default"
# fresh report suites (build_full_suite(variant=N)'s report half) and the ARCHITECTURE.md rule that must name them first
FRESH_SUITE_RULE = {1: "7. A third round", 2: "8. A fourth round", 3: "10. A fifth round", 4: "12. A seventh round",
                    5: "12. A seventh round", 6: "13. An eighth round", 7: "13. An eighth round"}
THIRD_ROUND_MODELS = ("shapes",)  # rules 7 and 8: the UNet only
FIFTH_ROUND_MODELS = ("shapes-dit",)  # rule 10: the transformer only
FOURTH_ROUND = frozenset(n for n in SCHEDULES if "-soft" in n)  # rule 8b: the method change (EditConfig.soft_mask)
# --decide --pooled: report suites as one table. The first two (context for the third round's verdict); all three
# (rule 8f: the test for calling issue #30 resolved on the UNet)
POOLED = {"report-pooled": ("report", "report-v1"), "report-pooled-all": ("report", "report-v1", "report-v2"),
          "report-pooled-4": ("report", "report-v1", "report-v2", "report-v3"),  # (rule 10e: the transformer's fifth round)
          "report-pooled-fresh": ("report-v4", "report-v5"),  # (rule 12: the seventh round's verdict)
          "report-pooled-fresh-2": ("report-v6", "report-v7")}  # (rule 13: the eighth round's verdict)
# what each pooled table is for: (the title's words on its suites, the footer's)
POOLED_ROLE = {
    "report-pooled": ("the report halves of 2 suites pooled (variants 0-1: context, chooses nothing; the issue's test is "
                      "each suite's)", "context for the two verdicts, not a third one; nothing is chosen on it."),
    "report-pooled-all": ("the report halves of 3 suites pooled (variants 0-2: rules 8f and 9b: the test for calling the "
                          "issue resolved; chooses nothing)", "rules 8f and 9b: the defaults must pass here for the issue to "
                          "be called resolved; nothing is chosen on it."),
    "report-pooled-4": ("the report halves of 4 suites pooled (variants 0-3: rule 10e: the transformer's fifth-round pick "
                        "must pass here too; chooses nothing)", "rule 10e: the transformer's fifth-round pick must pass here "
                        "too; nothing is chosen on it."),
    "report-pooled-fresh": ("the report halves of the two fresh suites of rule 12 pooled (variants 4-5: the seventh round's "
                            "verdict, shape success read on solid frames; chooses nothing)", "rule 12d: the seventh round's "
                            "verdict, shape success read on solid frames; nothing is chosen on it."),
    "report-pooled-fresh-2": ("the report halves of the two fresh suites of rule 13 pooled (variants 6-7: the eighth round's "
                              "verdict, shape success read on solid frames; chooses nothing)", "rule 13e: the eighth round's "
                              "verdict, shape success read on solid frames; nothing is chosen on it."),
}
# rule 12: on the suites it registered (and rule 13's), a shape edit counts only on frames whose object is solid
# (toyworld.metrics.solid); so does a pool made of those suites only
SOLID_SUITES = frozenset({"report-v4", "report-v5", "report-v6", "report-v7"})
SOLID_SHAPE_HALVES = SOLID_SUITES | {name for name, parts in POOLED.items() if set(parts) <= SOLID_SUITES}


def shape_key(half: str | None) -> str:
    """The metric a half's shape success reads: ``shape_solid_ok`` on rule 12's suites, ``shape_ok`` elsewhere."""
    return "shape_solid_ok" if half in SOLID_SHAPE_HALVES else "shape_ok"


def held_out_suite() -> list[dict]:
    return build_suite(seed=1, n_colour=4, n_shape=3, n_both=3)


@contextlib.contextmanager
def counted(backbone):
    """Count the denoiser's forward batch elements through ``predict_noise`` (the peers' call site)."""
    calls = {"forward": 0, "backward": 0}
    orig = backbone.predict_noise

    def wrapper(x_t, *a, **k):
        calls["forward"] += x_t.shape[0]
        return orig(x_t, *a, **k)

    backbone.predict_noise = wrapper
    try:
        yield calls
    finally:
        del backbone.predict_noise  # the instance attribute; the method is the class's again


SCHEDULE_KEYS = ("steps", "lr", "optimizer", "momentum", "t_schedule", "lr_schedule", "guidance_scale", "s_ssm_weight",
                 "t_ssm_weight", "soft_mask", "t_min")


def schedule_of(config: dict) -> dict:
    """What a run record keeps of its edit's settings (``EditConfig.to_dict()`` or a report's ``config``): the
    schedule's knobs, so a cache shows what actually ran."""
    return {k: config[k] for k in SCHEDULE_KEYS}


def run_paper(pipe, case, clip, snapshots=SNAPSHOTS, method="paper", **settings) -> list[dict]:
    """One 200-step edit at the paper's settings, scored at every snapshot and at each stop rule's step."""
    from fastdm.driver.schedule import ConvergenceRule

    t0 = time.perf_counter()
    # preset "paper": the paper's schedule whatever the model folder's fastdm.json or EditConfig's defaults say (without it
    # these runs were, from the defaults' change on, fastdm's own annealed cosine schedule stretched to 200 steps)
    run = pipe.prepare(clip, case["source_prompt"], case["target_prompt"], mask="auto", steps=max(snapshots), seed=0,
                       preset="paper", **settings)
    rules = {r: ConvergenceRule(r[0], r[1], run.mask) for r in STOP_RULES}
    stopped: dict[tuple, int] = {}
    out, trace = [], []
    while not run.done:
        prev = run.x.detach().clone()
        run.step()
        k = run.step_index
        trace.append({"t": run.last_t, "dx": float((run.x.detach() - prev).norm()), "vdds": float(run.losses["vdds"])})
        label = []
        if k in snapshots:
            label.append(f"{method}@{k}")
        for r, rule in rules.items():
            if r not in stopped and rule.update(run.x):
                stopped[r] = k
                label.append(f"{method}-auto(w{r[0]},tol{r[1]:g})")
        for name in label:
            secs = time.perf_counter() - t0
            out.append({"method": name, "steps": k, "evaluations": dict(run.evaluations), "seconds": secs,
                        "frames": frames_of(pipe.backbone, run.x), "schedule": schedule_of(run.config.to_dict())})
    for r in STOP_RULES:  # a rule that never fired ran to the cap
        if r not in stopped:
            last = next(o for o in out if o["method"] == f"{method}@{max(snapshots)}")
            out.append({**last, "method": f"{method}-auto(w{r[0]},tol{r[1]:g})"})
    for o in out:
        o["trace"] = trace[: o["steps"]] if o["method"] == f"{method}@{max(snapshots)}" else None
    return out


# name -> (steps, EditConfig settings with stop="extend"): the schedule and its continuation segments, simulated by one
# run per clip that always continues to the cap and is scored at every segment's end (run_extended); the rule that
# decides is then read off the recorded signals (extended_rows)
EXTENDED = {
    # segments repeating the schedule's low-t end (extend_span="low"): tried on the UNet, they do not finish colour
    # edits (10 clips run, 0 of the 3 unfinished ones finished after 3 segments); abandoned
    "ext-lr2.4-12": (12, dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine", extend_lr=0.5, extend_span="low")),
    # segments restarting the whole annealed schedule (extend_span="full")
    "extf-lr2.4-12": (12, dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine", extend_lr=0.5)),
    "extf-lr2.4-8": (8, dict(t_schedule="anneal", lr=2.4, lr_schedule="cosine", extend_lr=0.5)),
    "extf-lr3.2-12-r0.25": (12, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", extend_lr=0.25)),
    "extf-lr3.2-8": (8, dict(t_schedule="anneal", lr=3.2, lr_schedule="cosine", extend_lr=0.5)),  # rule 10b (transformer)
}
EXTEND_SEGMENT, EXTEND_MAX = 4, 3  # segment length and segments simulated (EditConfig's defaults)
EXTEND_RUN = {"stop": "extend", "extend_segment": EXTEND_SEGMENT, "extend_max": EXTEND_MAX}  # (the cache key assumes these)
EXTEND_TOLS = (("speed", 0.5), ("speed", 0.75), ("speed", 1.0), ("vdds", 0.9), ("vdds", 1.1))  # ExtensionRule.continues rules


def candidate_settings(name: str) -> tuple[int, dict]:
    """A candidate's steps and EditConfig settings: a schedule of :data:`SCHEDULES`, or a continuation rule
    ``<EXTENDED schedule>+<signal><tol>`` (the edit that decides as ``extended_rows`` reads it)."""
    from fastdm.driver.config import EXTEND_SIGNALS

    base, plus, rule = name.partition("+")
    if not plus and name in SCHEDULES:
        return SCHEDULES[name]
    on = next((s for s in EXTEND_SIGNALS if rule.startswith(s)), None)
    if base not in EXTENDED or on is None:
        raise KeyError(f"{name!r}: not a schedule of SCHEDULES nor <EXTENDED schedule>+<{'|'.join(EXTEND_SIGNALS)}><tol>")
    steps, settings = EXTENDED[base]
    return steps, {**settings, **EXTEND_RUN, "extend_on": on, "extend_tol": float(rule[len(on):])}


def run_extended(pipe, case, clip, steps: int, settings: dict, method: str) -> list[dict]:
    """One edit continued to the extension rule's cap, scored after the schedule and after every segment: the
    run to a segment's end *is* the edit the rule would have stopped there (segments do not depend on later ones)."""
    t0 = time.perf_counter()
    settings = over_builtins(pipe, {**EXTEND_RUN, **settings, "stop": "extend", "steps": steps})  # (a test may shorten the segments)
    run = pipe.prepare(clip, case["source_prompt"], case["target_prompt"], mask="auto", seed=0, **settings)
    run.extension.force = True
    seg = run.extension.segment
    out = []
    while not run.done:
        run.step()
        k = run.step_index
        if k >= steps and (k - steps) % seg == 0:
            out.append({"method": f"{method}@{k}", "steps": k, "evaluations": dict(run.evaluations),
                        "seconds": time.perf_counter() - t0, "frames": frames_of(pipe.backbone, run.x),
                        "signals": run.extension.signals(k)})
    out[-1]["trace"] = run.extension.records
    return out


def run_schedule(pipe, case, clip, steps: int, settings: dict, method: str) -> list[dict]:
    t0 = time.perf_counter()
    res = pipe(clip, case["source_prompt"], case["target_prompt"], mask="auto", seed=0, **over_builtins(pipe, {**settings, "steps": steps}))
    return [{"method": method, "steps": res.report["steps_run"], "evaluations": res.report["evaluations"],
             "seconds": time.perf_counter() - t0, "frames": res.frames, "stop": res.report["stop"],
             "schedule": schedule_of(res.report["config"])}]


def run_sdedit(pipe, case, clip, strength: float) -> list[dict]:
    from fastdm.sampling import ddim_video_to_video

    bb = pipe.backbone
    t0 = time.perf_counter()
    with counted(bb) as calls:
        frames = ddim_video_to_video(bb, clip, case["target_prompt"], strength=strength, steps=50, guidance_scale=7.5, seed=0)
    return [{"method": f"sdedit-{strength:g}", "steps": round(50 * strength), "evaluations": dict(calls),
             "seconds": time.perf_counter() - t0, "frames": frames}]


def run_flowedit(pipe, case, clip) -> list[dict]:
    bb = pipe.backbone
    t0 = time.perf_counter()
    from fastdm.sampling import flowedit

    with counted(bb) as calls:
        frames = flowedit(bb, clip, case["source_prompt"], case["target_prompt"])
    return [{"method": "flowedit", "steps": 33, "evaluations": dict(calls), "seconds": time.perf_counter() - t0,
             "frames": frames}]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a rate k / n."""
    if not n:
        return None
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def bootstrap(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of a mean (fixed seed: the tables are reproducible)."""
    if not values:
        return None
    v = np.asarray(values, float)
    means = np.random.default_rng(seed).choice(v, (reps, len(v))).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(runs: list[dict], shape: str = "shape_ok") -> dict:
    """Each method's rates, means and intervals; ``shape``: the metric shape success reads (:func:`shape_key`).
    Beside it, where every run has them: the other shape reading and the mean share of solid frames."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == name]
        col = [r for r in rs if r["kind"] in ("colour", "both")]
        shp = [r for r in rs if r["kind"] in ("shape", "both")]
        drifts = [r["metrics"]["drift_px"] for r in rs if math.isfinite(r["metrics"]["drift_px"])]
        out[name] = {
            "edits": len(rs),
            "steps": float(np.mean([r["steps"] for r in rs])),
            "forward": float(np.mean([r["evaluations"]["forward"] for r in rs])),
            "backward": float(np.mean([r["evaluations"]["backward"] for r in rs])),
            "seconds": float(np.median([r["seconds"] for r in rs])),
            "worst_evaluations": max(r["evaluations"]["forward"] + r["evaluations"]["backward"] for r in rs),
            "colour_success": sum(r["metrics"]["colour_ok"] for r in col) / len(col) if col else None,
            "shape_success": sum(r["metrics"][shape] for r in shp) / len(shp) if shp else None,
            "shape_measure": shape,
            "shape_success_fill_only": (sum(r["metrics"]["shape_ok"] for r in shp) / len(shp)
                                        if shp and shape != "shape_ok" else None),
            "solid_frames": (float(np.mean([r["metrics"]["solid_frames"] for r in rs]))
                             if all("solid_frames" in r["metrics"] for r in rs) else None),
            "mean_drift_px": float(np.mean(drifts)) if drifts else None,
            "object_lost": len(rs) - len(drifts),
            "area_kept": sum(r["metrics"]["area_kept"] for r in rs) / len(rs),
            "background_change": float(np.mean([r["metrics"]["background_change"] for r in rs])),
            "motion_fidelity": float(np.mean([r["metrics"]["motion_fidelity"] for r in rs])),
            "frame_consistency": float(np.mean([r["metrics"]["frame_consistency"] for r in rs])),
            # 95 % intervals: Wilson for the rates, a percentile bootstrap for the mean drift
            "colour_success_ci": wilson(sum(r["metrics"]["colour_ok"] for r in col), len(col)),
            "shape_success_ci": wilson(sum(r["metrics"][shape] for r in shp), len(shp)),
            "area_kept_ci": wilson(sum(r["metrics"]["area_kept"] for r in rs), len(rs)),
            "mean_drift_px_ci": bootstrap(drifts),
        }
    return out


def markdown(title: str, summary: dict, meta: dict, note: str) -> str:
    def f(v, fmt, ci=None):
        if v is None:
            return "-"
        return format(v, fmt) + ("" if ci is None else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]")

    solid = any(s.get("shape_measure") == "shape_solid_ok" for s in summary.values())
    lines = [f"# {title} ({meta['machine']})", "",
             f"Machine: {meta['machine_description']}. Model: `{meta['model']}` ({meta['denoiser']} sha256 {meta['model_hash']}). "
             f"Clips: {meta['cases']} {meta.get('suite', 'held-out generated cases (`build_suite(seed=1)`)')}, automatic mask, seed 0. "
             f"Command: `{meta['command']}`.", "", note, "",
             "| method | edits | steps | forward evals | backward | s / edit (median) | colour success | shape success | " +
             ("shape success (fill ratio alone) | solid frames | " if solid else "") +
             "mean drift (px) | object lost | area kept | background change (0-255) | motion fidelity | frame consistency |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if solid else "")]
    for name, s in summary.items():
        extra = f"{f(s['shape_success_fill_only'], '.0%')} | {f(s['solid_frames'], '.0%')} | " if solid else ""
        lines.append(f"| {name} | {s['edits']} | {s['steps']:.1f} | {s['forward']:.0f} | {s['backward']:.0f} | {s['seconds']:.1f} | "
                     f"{f(s['colour_success'], '.0%', s.get('colour_success_ci'))} | {f(s['shape_success'], '.0%', s.get('shape_success_ci'))} | "
                     f"{extra}"
                     f"{f(s['mean_drift_px'], '.2f', s.get('mean_drift_px_ci'))} | "
                     f"{s['object_lost']} | {f(s['area_kept'], '.0%', s.get('area_kept_ci'))} | {s['background_change']:.2f} | {s['motion_fidelity']:.3f} | "
                     f"{s['frame_consistency']:.3f} |")
    lines += ["", "forward evals: denoiser batch elements per edit (4 per fastdm step, + 2 per automatic-mask call); backward: passes "
              "through the tapped prefix (1 per fastdm step). Brackets: 95 % intervals (Wilson for rates, percentile bootstrap "
              "for the mean drift). Colour success over colour and both edits, shape success over shape "
              "and both edits; area kept: the object's area within 0.5x-2x of the source's in every frame."]
    if solid:
        lines += ["", "Shape success (ARCHITECTURE.md rule 12): most frames read as the target shape *and* solid (at least 80 % of "
                  "the object's core pixels its colour, `fastdm/toyworld/metrics.py` `solid`); fill ratio alone: the reading of "
                  "rules 1-11. Solid frames: the mean share of frames whose object is solid, over all edits."]
    return "\n".join(lines) + "\n"


# the measures a default must match or beat on both models ("higher" is better unless listed in LOWER)
MEASURES = ("colour_success", "shape_success", "mean_drift_px", "area_kept", "background_change", "motion_fidelity",
            "frame_consistency")
LOWER = ("mean_drift_px", "background_change")
# differences that count as equal: background change is a mean over every pixel outside the object of a
# 0-255 difference; below 0.05 of one level it is under the rounding of the uint8 frames it is measured on
TOLERANCE = {"background_change": 0.05}


def choose(machine: str, models=("shapes", "shapes-dit"), reference: str = "paper@200") -> tuple[dict, str]:
    """Every measured schedule against the paper's 200 steps on both models: which match or beat it on
    every measure of both, and the cheapest of those (fewest forward + backward evaluations)."""
    files = {m: json.loads((RESULTS / f"cost-{m}-{machine}.json").read_text()) for m in models}
    tables = {m: f["summary"] for m, f in files.items()}
    ran_on = sorted({f["meta"]["machine_description"] for f in files.values()})
    names = sorted(set.intersection(*(set(t) for t in tables.values())) - {reference})
    rows = []
    for name in names:
        worse, within = [], []
        for m, t in tables.items():
            a, ref = t[name], t[reference]
            if a["edits"] != ref["edits"]:
                worse.append(f"{m}: {a['edits']} edits vs {ref['edits']}")
                continue
            for k in MEASURES:
                if a[k] is None or ref[k] is None:
                    continue
                if (a[k] > ref[k] + 1e-9) if k in LOWER else (a[k] < ref[k] - 1e-9):
                    tol = TOLERANCE.get(k, 0.0)
                    (within if abs(a[k] - ref[k]) <= tol else worse).append(f"{m} {k} {a[k]:.4g} vs {ref[k]:.4g}")
        cost = tables[models[0]][name]["forward"] + tables[models[0]][name]["backward"]
        rows.append({"schedule": name, "evaluations": cost, "holds": not worse, "strictly": not worse and not within,
                     "worse": worse, "within_tolerance": within})
    def drift(name):  # the tie-break among equally cheap schedules: mean centroid drift over both models
        return sum(t[name]["mean_drift_px"] or 0.0 for t in tables.values())

    rows.sort(key=lambda r: (not r["holds"], r["evaluations"], len(r["within_tolerance"]), drift(r["schedule"]), r["schedule"]))
    ref_cost = tables[models[0]][reference]["forward"] + tables[models[0]][reference]["backward"]
    winner = next((r for r in rows if r["holds"]), None)
    lines = [f"# The cheapest schedule that holds the paper's quality on both models ({machine})", "",
             f"Machine of the runs: {'; '.join(ran_on)}. "
             f"Each schedule of `cost-shapes-{machine}.md` and `cost-shapes-dit-{machine}.md` against `{reference}` "
             f"({ref_cost:.0f} evaluations: forward + backward per edit) on every measure ({', '.join(MEASURES)}; lower is better for "
             f"{', '.join(LOWER)}), on both models. Written by `python -m benchmarks.cost --choose`.", "",
             f"Differences within {', '.join(f'{v:g} ({k})' for k, v in TOLERANCE.items())} count as equal (see TOLERANCE in "
             "benchmarks/cost.py); such rows say so. Equally cheap schedules are ordered by their mean drift over both models.", "",
             "| schedule | evaluations | share of the paper's | holds on both models | where it falls short |", "|---|---|---|---|---|"]
    for r in rows:
        short = "; ".join(r["worse"][:4]) + (" ..." if len(r["worse"]) > 4 else "")
        if r["within_tolerance"]:
            short += ("; " if short else "") + "within tolerance: " + "; ".join(r["within_tolerance"])
        holds = ("yes" if r["strictly"] else "yes, within tolerance") if r["holds"] else "no"
        lines.append(f"| {r['schedule']} | {r['evaluations']:.0f} | 1/{ref_cost / r['evaluations']:.1f} | {holds} | {short} |")
    lines += ["", f"Winner: {winner['schedule'] if winner else 'none'}" + (f" ({winner['evaluations']:.0f} evaluations, "
              f"1/{ref_cost / winner['evaluations']:.1f} of the paper's)." if winner else ".")]
    meta = {"machine": machine, "machine_description": "; ".join(ran_on), "command": "python -m benchmarks.cost --choose"}
    return {"meta": meta, "reference": reference, "rows": rows, "winner": winner and winner["schedule"]}, "\n".join(lines) + "\n"


def extended_rows(runs: list[dict], tols=EXTEND_TOLS) -> list[dict]:
    """The edits a continuation rule would have made, read off the simulated runs of :data:`EXTENDED` (scored at
    every segment's end, each with the signals the rule reads there): per clip, the first segment end where
    ``ExtensionRule.continues`` says stop (or the cap), as a run of method ``<schedule>+<signal><tol>``."""
    from fastdm.driver.schedule import ExtensionRule

    by: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        base, _, k = r["method"].rpartition("@")
        if base in EXTENDED:
            by.setdefault((base, r["case"]), {})[int(k)] = r
    out = []
    for (base, case), at in by.items():
        ks = sorted(at)
        if len(ks) != 1 + EXTEND_MAX:
            continue  # (a run still in progress)
        for on, tol in tols:
            k = next((k for k in ks if k == ks[-1] or not ExtensionRule.continues(at[k]["signals"], tol, on)), ks[-1])
            out.append({**at[k], "method": f"{base}+{on}{tol:g}", "trace": None})
    return out


def mcnemar(won: int, lost: int) -> float:
    """Exact two-sided McNemar p-value of paired successes: ``won`` clips the candidate finished and the paper did
    not, ``lost`` the reverse (a binomial test of the discordant pairs at 1/2)."""
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def decide(machine: str, half: str = "choose", models=("shapes", "shapes-dit"), reference: str = "paper@200",
           hashes: dict | None = None) -> tuple[dict, str]:
    """ARCHITECTURE.md, "The rule that picks the default", applied to one half's tables of both bundled models
    (``hashes``: model -> denoiser hash, to read only runs of those weights)."""
    cap = 1002 / 12
    if half in POOLED:
        where = POOLED_ROLE[half][0]
    else:
        base, variant = half_parts(half)
        where = f"the {base} half" + (f" of the fresh suite `build_full_suite(variant={variant})` "
                                      f"(rule {fresh_rule_number(variant)})" if variant else "")
    out, lines = {}, [f"# The rule that picks the default, applied to {where} ({machine})", "",
                      "ARCHITECTURE.md, \"The rule that picks the default\": a candidate qualifies on a model when, against "
                      f"`{reference}` on the same clips, its colour success, shape success and area kept are at least the paper's, "
                      "its mean drift at most 0.1 px above, and its mean evaluations (forward + backward) at most 1002 / 12 = 83.5; "
                      "the cheapest qualifying candidate is the model's default (ties: lower drift, then fewer worst-case "
                      "evaluations). Shortfall: clips below the paper's counts (colour + shape + area kept). "
                      "Written by `python -m benchmarks.cost --decide " + ("--pooled" if half in POOLED else
                                                                            f"{half_args(*half_parts(half))}") +
                      ("`." if reference == "paper@200" else f" --reference {reference}`."), ""]
    if reference != "paper@200":
        lines[-1:-1] = ["", f"**Reference `{reference}`: fastdm's annealed cosine schedule stretched to 200 steps, which rounds "
                        "1-4 took for the paper's (ARCHITECTURE.md rule 9); \"the paper's\" above means it. These are the "
                        "tables as those rounds decided, not a comparison with the paper.**"]

    def no_verdict(model: str, reference_clips: int, why: str) -> None:
        out[model] = {"rows": [], "default": None, "qualified": False, "widest_margin": None, "fourth_round_pick": None,
                      "reference": None, "reference_clips": reference_clips}
        lines.extend([f"## {model}", "", f"No verdict: {why}", ""])

    for model in models:
        loaded = []
        missing = [p for p in POOLED.get(half, (half,)) if not (RESULTS / f"cost-{model}-{p}-{machine}.runs.jsonl").exists()]
        if missing:  # (a suite not run yet on this model: no verdict, rather than one on fewer clips)
            no_verdict(model, 0, f"no runs of this model on {', '.join(missing)} yet.")
            continue
        for part in POOLED.get(half, (half,)):  # pooled: each suite's clips named apart
            cache = RESULTS / f"cost-{model}-{part}-{machine}.runs.jsonl"
            loaded += [{**r, "case": f"{part}:{r['case']}"} if half in POOLED else r
                       for r in map(json.loads, cache.read_text().splitlines())]
        if hashes is not None:  # only runs of the model as it is now (a cache may hold runs of earlier weights)
            loaded = [r for r in loaded if r["model_hash"] == hashes[model]]
        runs = list({(r["method"], r["case"]): r for r in loaded}.values())  # one run per method and clip: the last
        n_cases = len({r["case"] for r in runs})
        runs = runs + extended_rows(runs)
        table = summarize(runs, shape_key(half))
        if reference not in table or table[reference]["edits"] != n_cases:
            have = table[reference]["edits"] if reference in table else 0
            no_verdict(model, have, f"`{reference}` has run on {have} of these {n_cases} clips (rule 9: the runs once "
                       "labelled so were not the paper's schedule and are `anneal200@k` now; the real preset's runs land "
                       "clip by clip).")
            continue
        ref = table[reference]

        def counts(method):  # clips a method finished: colour and shape edits, area kept
            rs = [r for r in runs if r["method"] == method]
            return {k: sum(r["metrics"][m] for r in rs if r["kind"] in kinds) for k, m, kinds in
                    (("colour", "colour_ok", ("colour", "both")), ("shape", shape_key(half), ("shape", "both")),
                     ("area", "area_kept", ("colour", "shape", "both")))}

        ref_counts = counts(reference)
        ok_ref = {(r["case"], m): r["metrics"][m] for r in runs if r["method"] == reference
                  for m in ("colour_ok", "area_kept")}

        def paired(method, metric, kinds):  # clips won and lost against the reference, one by one
            rs = [r for r in runs if r["method"] == method and r["kind"] in kinds and (r["case"], metric) in ok_ref]
            won = sum(bool(r["metrics"][metric]) and not ok_ref[(r["case"], metric)] for r in rs)
            lost = sum(not r["metrics"][metric] and bool(ok_ref[(r["case"], metric)]) for r in rs)
            return won, lost

        rows = []
        for name, a in table.items():
            if name == reference or a["edits"] != n_cases or "auto" in name or name.split("@")[0] in EXTENDED or \
                    name.startswith(("paper@", "dds", "sdedit", "flowedit", "anneal200")):
                continue
            got = counts(name)
            short = {k: max(0, ref_counts[k] - v) for k, v in got.items()}
            ev = a["forward"] + a["backward"]
            why = [f"{k} {v} clip(s) short" for k, v in short.items() if v]
            if a["mean_drift_px"] > ref["mean_drift_px"] + 0.1:
                why.append(f"drift {a['mean_drift_px']:.2f} > {ref['mean_drift_px']:.2f} + 0.1")
            if ev > cap:
                why.append(f"{ev:.1f} evaluations > 83.5")
            pc, pa = paired(name, "colour_ok", ("colour", "both")), paired(name, "area_kept", ("colour", "shape", "both"))
            rows.append({"candidate": name, "evaluations": ev, "worst": a["worst_evaluations"], "drift": a["mean_drift_px"],
                         "colour": a["colour_success"], "shape": a["shape_success"], "area": a["area_kept"],
                         "shortfall": sum(short.values()), "margin": sum(got.values()) - sum(ref_counts.values()),
                         "counts": got, "reference_counts": ref_counts,
                         "qualifies": not why, "why_not": why,
                         "paired_colour": [*pc, mcnemar(*pc)], "paired_area": [*pa, mcnemar(*pa)]})
        rows.sort(key=lambda r: (not r["qualifies"], r["evaluations"] if r["qualifies"] else r["shortfall"],
                                 r["evaluations"], r["drift"], r["worst"]))
        qual = [r for r in rows if r["qualifies"]]
        pick = qual[0] if qual else min((r for r in rows if r["evaluations"] <= cap),
                                        key=lambda r: (r["shortfall"], r["evaluations"], r["drift"]), default=None)
        # rule 7c (third round): the qualifying candidate with the largest margin over the paper, ties as rule 3
        def by_margin(r):  # widest margin first, ties as rule 3
            return -r["margin"], r["evaluations"], r["drift"], r["worst"]

        wide = min(qual, key=by_margin, default=None)
        # rule 8c (fourth round): among its method-change candidates that qualify, the widest margin, at least +1 clip
        fourth = min((r for r in qual if r["candidate"] in FOURTH_ROUND and r["margin"] >= 1),
                     key=by_margin, default=None)
        out[model] = {"rows": rows, "default": pick and pick["candidate"], "qualified": bool(qual),
                      "widest_margin": wide and wide["candidate"], "fourth_round_pick": fourth and fourth["candidate"],
                      "reference": {k: ref[k] for k in ("colour_success", "shape_success", "area_kept", "mean_drift_px")}}
        lines += [f"## {model}", "",
                  f"{reference}: colour {ref['colour_success']:.0%}, shape {ref['shape_success']:.0%}, area kept {ref['area_kept']:.0%}, "
                  f"drift {ref['mean_drift_px']:.2f} px, {ref['forward'] + ref['backward']:.0f} evaluations.", "",
                  "| candidate | mean evaluations | worst | colour | shape | area kept | drift (px) | qualifies | why not "
                  "| margin (clips) | colour won / lost vs paper (p) | area won / lost (p) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            pc, pa = r["paired_colour"], r["paired_area"]
            lines.append(f"| {r['candidate']} | {r['evaluations']:.1f} | {r['worst']} | {r['colour']:.0%} | {r['shape']:.0%} | "
                         f"{r['area']:.0%} | {r['drift']:.2f} | {'yes' if r['qualifies'] else 'no'} | {'; '.join(r['why_not'])} "
                         f"| {r['margin']:+d} | {pc[0]} / {pc[1]} ({pc[2]:.2f}) | {pa[0]} / {pa[1]} ({pa[2]:.2f}) |")
        lines += ["", "margin: clips finished (colour + shape edits, area kept) minus the paper's on these clips. won / lost: clips the "
                  "candidate finished and the paper did not, and the reverse, clip by clip; p: exact two-sided McNemar test of "
                  "those pairs (context for the counts; the rule above counts clips)."]
        if half in POOLED:
            out[model]["default"] = None
            lines += ["", f"Pooled over {len(POOLED[half])} report suites ({n_cases} clips; candidates run on all of them only): "
                      f"{POOLED_ROLE[half][1]}", ""]
        elif half.startswith("report"):  # nothing is chosen here (rule 5): the table says whether the chosen default holds
            out[model]["default"] = None
            lines += ["", "The report half chooses nothing (rule 5); `qualifies` is the issue's test on clips the choice never saw.", ""]
        else:
            lines += ["", f"Rules 2-4 (the first and second rounds: the cheapest qualifying candidate): **{out[model]['default']}**" +
                      ("" if qual else " (none qualifies: the fewest clips short within 83.5 evaluations; rule 4)"),
                      "", (f"Rule 7c (the third round's: the qualifying candidate with the widest margin, all rounds' candidates): "
                           f"**{out[model]['widest_margin']}**" if wide else "Rule 7c: none qualifies (rule 4's pick above)")
                      if model in THIRD_ROUND_MODELS else "The third round (rule 7) leaves this model's default as it is.", "",
                      (f"Fourth round's pick (rule 8c: among its method-change candidates, {', '.join(sorted(FOURTH_ROUND))}, the "
                       "qualifying one with the widest margin, at least +1 clip): " +
                       (f"**{fourth['candidate']}** ({fourth['margin']:+d}); it becomes the default only if it passes on the "
                        "fresh suite `--half report --variant 2` (rule 8e)" if fourth else "none; the round ends on the choose half"))
                      if model in THIRD_ROUND_MODELS else "The fourth round (rule 8) leaves this model's default as it is.", ""]
            if reference == "paper@200":  # rule 9b: the present default re-checked against the real paper
                present = next((r for r in rows if r["candidate"] == MODEL_DEFAULTS.get(model)), None)
                kept = bool(present and present["qualifies"])
                out[model]["rule_9b"] = present["candidate"] if kept else out[model]["default"]
                lines += [f"Rule 9b (the present default, {MODEL_DEFAULTS.get(model)}, against the real paper): " +
                          ("it qualifies and stays." if kept else
                           f"it does not qualify ({'; '.join(present['why_not']) if present else 'not run on every clip'}); "
                           f"chosen again by rules 2-3 among the candidates already run: **{out[model]['default']}**."), ""]
            if model in FIFTH_ROUND_MODELS:  # rule 10c: the widest margin among all candidates (as rule 7c)
                out[model]["fifth_round_pick"] = out[model]["widest_margin"]
                lines += [f"Rule 10c (the fifth round's pick for this model: the qualifying candidate with the widest margin, "
                          f"all rounds' candidates): **{out[model]['widest_margin']}**" +
                          (" (the present default: the fresh suite replicates it)" if out[model]["widest_margin"] ==
                           MODEL_DEFAULTS.get(model) else ""), ""]
    return out, "\n".join(lines) + "\n"


def eighth_round(machine: str, decided: dict, model: str = "shapes-dit",
                 design: tuple[str, str] = ("report-pooled-4", "report-pooled-fresh")) -> tuple[dict, str]:
    """ARCHITECTURE.md rule 13c: among EIGHTH_ROUND's candidates, those that qualify by rule 2 on both pooled design tables
    (the spent report suites, variants 0-3 and 4-5), the widest summed margin (ties as rule 3). On the first (variants
    0-3: the fill-ratio shape reading, meaningless on the transformer, rule 12a) the shape clause is left out of both the
    test and the margin (13c's amendment); shape edits are judged on the second, read on solid frames. Ties: fewer
    evaluations, then the two pools' mean drifts summed (unweighted), then fewer worst-case evaluations."""
    def without_shape(g):
        return {**g, "why_not": [w for w in g["why_not"] if not w.startswith("shape ")],
                "margin": g["margin"] - (g["counts"]["shape"] - g["reference_counts"]["shape"])}

    rows = []
    for name in EIGHTH_ROUND:
        got = [next((r for r in decided[d][model]["rows"] if r["candidate"] == name), None) for d in design]
        if any(g is None for g in got):  # not run on every clip of both pools yet
            rows.append({"candidate": name, "complete": False})
            continue
        got[0] = without_shape(got[0])
        rows.append({"candidate": name, "complete": True, "qualifies": all(not g["why_not"] for g in got),
                     "margins": [g["margin"] for g in got], "margin": sum(g["margin"] for g in got),
                     "why_not": [f"{d}: {w}" for d, g in zip(design, got) for w in g["why_not"]],
                     "evaluations": max(g["evaluations"] for g in got), "worst": max(g["worst"] for g in got),
                     "drift": [g["drift"] for g in got]})
    done = [r for r in rows if r["complete"]]
    qual = [r for r in done if r["qualifies"]]
    pick = min(qual, key=lambda r: (-r["margin"], r["evaluations"], sum(r["drift"]), r["worst"]), default=None)
    complete = len(done) == len(rows)
    lines = [f"# Rule 13c: the eighth round's pick for {model} ({machine})", "",
             f"Candidates (`EIGHTH_ROUND`) against the real paper on the spent report suites, pooled as `{design[0]}` (variants "
             f"0-3: colour, area kept, drift and cost; the fill-ratio shape reading left out, rule 13c's amendment) and "
             f"`{design[1]}` (variants 4-5, every clause, shape on solid frames). A candidate must qualify by rule 2 on both; "
             "the widest summed margin wins (ties as rule 3). Written by `python -m benchmarks.cost --decide --pooled`.", "",
             "| candidate | qualifies on both | margin (v0-3 without shape / v4-5) | summed | drift px (v0-3 / v4-5) | evaluations | why not |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["complete"]:
            lines.append(f"| {r['candidate']} | (not run on every clip of both) | | | | | |")
            continue
        lines.append(f"| {r['candidate']} | {'yes' if r['qualifies'] else 'no'} | {r['margins'][0]:+d} / {r['margins'][1]:+d} | "
                     f"{r['margin']:+d} | {r['drift'][0]:.2f} / {r['drift'][1]:.2f} | {r['evaluations']:.1f} | "
                     f"{'; '.join(r['why_not'])} |")
    verdict = (("**" + pick["candidate"] + "**: it runs once on the fresh suites (rule 13d)") if pick else
               "none qualifies on both: the round ends on the spent suites (rule 13c)") if complete else \
        "not every candidate has run on both pools yet: no pick"
    lines += ["", f"Pick: {verdict}.", ""]
    return {"model": model, "design": list(design), "rows": rows, "pick": pick["candidate"] if pick and complete else None,
            "complete": complete}, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fastdm import DreamMotionPipeline
    from fastdm.backbone import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--methods", default="paper", help=f"paper, schedules ({', '.join(SCHEDULES)}), peers ({', '.join(PEERS)})")
    ap.add_argument("--cases", type=int, default=None, help="only the first N held-out cases")
    ap.add_argument("--half", choices=("choose", "report"), default=None,
                    help="the full suite's choose or report half (fastdm/toyworld/suite.py) instead of the 10 held-out cases; "
                         "the report half runs only once ARCHITECTURE.md states the rule that picks the default")
    ap.add_argument("--variant", type=int, default=0,
                    help="with --half report: the report half of build_full_suite(variant=N), a fresh suite of the same make-up "
                         "(ARCHITECTURE.md rules 7 and 8: variants 1 and 2 are the third and fourth rounds'; each runs only once its rule "
                         "is written)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--choose", action="store_true", help="from both models' tables: the cheapest schedule that holds "
                    "the paper's quality on every measure (writes results/cost-choice-<machine>.{json,md})")
    ap.add_argument("--decide", action="store_true", help="apply ARCHITECTURE.md's rule that picks the default to --half's "
                    "tables of both models (writes results/cost-decision-<half>-<machine>.{json,md})")
    ap.add_argument("--pooled", action="store_true", help="with --decide: the report suites as one table (variants 0-1, and 0-2), "
                    "(writes results/cost-decision-<name>-<machine>.{json,md} for each of POOLED's names)")
    ap.add_argument("--reference", default="paper@200", choices=("paper@200", "anneal200@200"),
                    help="with --decide: what the candidates are held against; anneal200@200 rewrites the tables of rounds "
                         "1-4 as they were decided, against the schedule then mislabelled paper (ARCHITECTURE.md rule 9), to "
                         "results/cost-decision-<half>-anneal200-<machine>")
    ap.add_argument("--tables", action="store_true", help="rewrite the tables from the run caches, run nothing")
    args = ap.parse_args(argv)
    if args.variant and args.half != "report":
        ap.error("--variant N is a fresh report suite: give it with --half report (choices are made on variant 0's choose half)")
    if args.variant < 0:
        ap.error("--variant: a whole number >= 0")
    half = args.half and half_label(args.half, args.variant)
    if args.pooled:
        if not args.decide or args.variant:
            ap.error("--pooled goes with --decide (and no --variant): it reads the report suites")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decide:
        hashes = {m: denoiser_hash(resolve_model(m))[1] for m in ("shapes", "shapes-dit")}
        decided = {}
        for label in (list(POOLED) if args.pooled else [half or "choose"]):
            data, md = decide(machine_name(), label, hashes=hashes, reference=args.reference)
            tag = "" if args.reference == "paper@200" else f"-{args.reference.split('@')[0]}"
            write_results(f"cost-decision-{label}{tag}-{machine_name()}", data, md)
            decided[label] = data
            print(md)
        if args.pooled and args.reference == "paper@200":
            data, md = eighth_round(machine_name(), decided)
            write_results(f"cost-decision-eighth-round-{machine_name()}", data, md)
            print(md)
        return 0
    if args.choose:
        data, md = choose(machine_name())
        write_results(f"cost-choice-{machine_name()}", data, md)
        print(md)
        return 0
    model = resolve_model(args.model)
    denoiser, model_hash = denoiser_hash(model)
    machine = machine_name()
    name = args.model if args.model in ("shapes", "shapes-dit") else repo_relative(model).replace("/", "-")
    if args.half:
        name = f"{name}-{half}"
        architecture = (Path(__file__).resolve().parent.parent / "ARCHITECTURE.md").read_text()
        if args.half == "report" and RULE_HEADING not in architecture:
            raise SystemExit(f"error: the report half is run once, after ARCHITECTURE.md states the rule that picks the default "
                             f"(a section '{RULE_HEADING}'); choose on --half choose first")
        if args.variant and args.variant not in FRESH_SUITE_RULE:
            raise SystemExit(f"error: report suite variant {args.variant} is not pre-registered; variants: {sorted(FRESH_SUITE_RULE)}")
        if args.variant and FRESH_SUITE_RULE[args.variant] not in architecture:
            raise SystemExit(f"error: report suite variant {args.variant} has no rule in ARCHITECTURE.md that says what runs on it; "
                             f"write one first ('{FRESH_SUITE_RULE[args.variant]}')")
    cache = RESULTS / f"cost-{name}-{machine}.runs.jsonl"
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["case"], r["model_hash"])] = r
    suite = (suite_half(build_full_suite(variant=args.variant), args.half) if args.half else held_out_suite())[: args.cases]
    if args.tables:
        write_tables(done, suite, name, model, denoiser, model_hash, machine)
        return 0
    pipe = DreamMotionPipeline.from_pretrained(model)
    flow = pipe.backbone.info.prediction_type == "flow"
    written = time.monotonic()
    for method in args.methods.split(","):
        if method == "flowedit" and not flow:
            print("flowedit: skipped, the model is not flow-matching")
            continue
        for case in suite:
            key_method = ("paper@200" if method == "paper" else "dds@200" if method == "dds" else
                          f"{method}@{EXTENDED[method][0] + EXTEND_MAX * EXTEND_SEGMENT}" if method in EXTENDED else method)
            if (key_method, case["id"], model_hash) in done:
                continue
            clip = render_case(case)
            if method == "paper":
                got = run_paper(pipe, case, clip)
            elif method == "dds":
                got = run_paper(pipe, case, clip, snapshots=(25, 200), method="dds", s_ssm_weight=0.0, t_ssm_weight=0.0)
                got = [g for g in got if "auto" not in g["method"]]
            elif method in SCHEDULES:
                steps, settings = SCHEDULES[method]
                got = run_schedule(pipe, case, clip, steps, settings, method)
            elif method in EXTENDED:
                steps, settings = EXTENDED[method]
                got = run_extended(pipe, case, clip, steps, settings, method)
            elif method.startswith("sdedit-"):
                got = run_sdedit(pipe, case, clip, float(method.split("-")[1]))
            elif method == "flowedit":
                got = run_flowedit(pipe, case, clip)
            else:
                raise SystemExit(f"error: unknown method {method!r}; choose paper, {', '.join(SCHEDULES)} or {', '.join(PEERS)}")
            with open(cache, "a") as fh:
                for g in got:
                    frames = g.pop("frames")
                    rec = {**g, "case": case["id"], "kind": case["kind"], "model_hash": model_hash, "threads": torch.get_num_threads(),
                           "machine": machine, "machine_description": machine_description(), "metrics": score(case, clip, frames)}
                    rec["metrics"].pop("colour_frames", None)
                    rec["metrics"].pop("shape_frames", None)
                    fh.write(json.dumps(rec) + "\n")
                    done[(rec["method"], case["id"], model_hash)] = rec
                    m = rec["metrics"]
                    print(f"{rec['method']:28s} {case['id']} colour {m['colour_ok']!s:5s} shape {m['shape_ok']!s:5s} drift "
                          f"{m['drift_px']:.2f} area {m['area_kept']!s:5s} fwd {rec['evaluations']['forward']} ({rec['seconds']:.0f}s)",
                          flush=True)
            if time.monotonic() - written > 120:  # the tables from the cache now and then (the cache itself is per clip)
                write_tables(done, suite, name, model, denoiser, model_hash, machine)
                written = time.monotonic()
    write_tables(done, suite, name, model, denoiser, model_hash, machine)
    return 0


def fresh_rule_number(variant: int) -> str:
    """The ARCHITECTURE.md rule that registered fresh suite ``variant`` ("7" for variant 1)."""
    return FRESH_SUITE_RULE[variant].split(".")[0]


def half_label(half: str, variant: int = 0) -> str:
    """The name a half's runs and tables carry: ``report`` or, for a fresh suite, ``report-v1``."""
    return f"{half}-v{variant}" if variant else half


def half_parts(label: str) -> tuple[str, int]:
    """A half label's half and suite variant: ``report-v1`` -> ``("report", 1)``, ``choose`` -> ``("choose", 0)``."""
    half, _, variant = label.partition("-v")
    return half, int(variant) if variant else 0


def half_args(half: str, variant: int = 0) -> str:
    """The command-line arguments that name a half (and a fresh suite's variant)."""
    return f"--half {half}" + (f" --variant {variant}" if variant else "")


def split_name(name: str) -> tuple[str, str | None, int]:
    """A cache name's model, half and suite variant: ``shapes-dit-report-v1`` -> ``("shapes-dit", "report", 1)``."""
    for half in HALVES:
        head, sep, tail = name.rpartition(f"-{half}")
        if sep and (not tail or tail.startswith("-v") and tail[2:].isdigit()):
            return (head, *half_parts(half + tail))
    return name, None, 0


def write_tables(done: dict, suite: list[dict], name: str, model: str, denoiser: str, model_hash: str, machine: str) -> None:
    ids = {c["id"] for c in suite}
    runs = [r for (m, c, h), r in done.items() if h == model_hash and c in ids]
    runs += extended_rows(runs)
    _, on = runs_machines(runs)  # names the cores, the CPU and the threads the runs had
    meta = {"machine": machine, "machine_description": on, "model": repo_relative(model), "denoiser": denoiser,
            "model_hash": model_hash, "cases": len(ids), "command": f"python -m benchmarks.cost --model {name} --methods ..."}
    base, half, variant = split_name(name)
    if half:
        meta["suite"] = (f"cases of the full suite's {half} half (`fastdm/toyworld/suite.py`: every ordered colour pair and "
                         "shape pair, split by a fixed rule)" + (f"; fresh clips: `build_full_suite(variant={variant})`, "
                                                                 f"ARCHITECTURE.md rule {fresh_rule_number(variant)}"
                                                                 if variant else ""))
        meta["command"] = f"python -m benchmarks.cost --model {base} {half_args(half, variant)} --methods ..."
    default = MODEL_DEFAULTS.get(base, DEFAULT_SCHEDULE)
    peers = [r for r in runs if r["method"].split("@")[0].split("-")[0] in ("dds", "sdedit", "flowedit")
             or r["method"] in ("paper@200", default)]
    ours = [r for r in runs if r not in peers or r["method"] in ("paper@200", default)]

    def order(rs):
        return sorted(rs, key=lambda r: (r["evaluations"]["forward"] + r["evaluations"]["backward"], r["method"]))

    shape = shape_key(half_label(half, variant) if half else None)
    cost = summarize(order(ours), shape)
    write_results(f"cost-{name}-{machine}", {"meta": meta, "summary": cost},
                  markdown("Edit quality against cost", cost, meta,
                           "paper@k: the paper's schedule (`--preset paper`) stopped at step k; paper-auto(...): stopped by the "
                           "convergence rule (window, tol; driver/schedule.py ConvergenceRule), cap 200; anneal200@k / "
                           "anneal200-vdds@k: fastdm's annealed cosine schedule at the default lr of the day stretched to 200 "
                           "steps (with / without S-SSM and T-SSM), which these tables called paper / DDS until ARCHITECTURE.md "
                           "rule 9; other rows: benchmarks/cost.py SCHEDULES."))
    if peers:
        peer = summarize(order(peers), shape)
        write_results(f"peers-{name}-{machine}", {"meta": meta, "summary": peer},
                      markdown("fastdm beside the editors a user would pick instead", peer, meta,
                               f"{default}: fastdm-edit's default on this model; paper@200: --preset paper; "
                               "dds@k: V-DDS alone (fastdm vdds_only, automatic mask); sdedit-S: source noised to strength S of "
                               "50 DDIM steps, sampled with the target prompt (no mask); flowedit: T 50, n_max 33, guidance 3.5/13.5 "
                               "(no mask)."))


if __name__ == "__main__":
    raise SystemExit(main())
