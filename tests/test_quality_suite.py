"""The quality suite's bookkeeping: the fixed case list, sweep overrides, and which cached runs count."""

import pytest
import torch

from benchmarks.quality import (
    CONFIGS,
    box_mask,
    build_suite,
    edit_config,
    parse_overrides,
    render_case,
    summarize,
    sweep_summary,
)
from fastdm.errors import FastDMError
from fastdm.toyworld.world import COLOURS, SHAPES


def test_suite_is_fixed_and_each_case_asks_for_a_change():
    suite = build_suite()
    assert suite == build_suite()  # seeded: the cache keys stay meaningful across sessions
    assert [c["kind"] for c in suite].count("colour") == 12 and len(suite) == 24
    for c in suite:
        assert c["colour"] in COLOURS and c["target_colour"] in COLOURS and c["shape"] in SHAPES
        if c["kind"] in ("colour", "both"):
            assert c["target_colour"] != c["colour"]
        if c["kind"] in ("shape", "both"):
            assert c["target_shape"] != c["shape"]


def test_box_mask_covers_the_object_in_every_frame():
    case = build_suite()[0]
    clip = render_case(case)
    m = box_mask(clip)
    assert m.shape == clip.shape[:3]
    lit = clip.max(axis=-1) > 40
    assert (m[lit] == 1).all() and 0 < m.mean() < 0.5


def test_overrides_are_typed_and_bad_ones_say_what_to_do():
    assert parse_overrides(["guidance_scale=15", "t_ssm_weight=1e4", "mask_scope=vdds"]) == {
        "guidance_scale": 15.0, "t_ssm_weight": 1e4, "mask_scope": "vdds"}
    with pytest.raises(FastDMError, match="FIELD=VALUE"):
        parse_overrides(["no_such_field=1"])
    with pytest.raises(FastDMError, match="not a float"):
        parse_overrides(["guidance_scale=high"])


def test_ablation_settings_win_over_a_sweep():
    case = build_suite()[0]
    cfg = edit_config(case, "no_tssm", 200, 0.4, {"t_ssm_weight": 1e4, "guidance_scale": 12.0})
    assert cfg.t_ssm_weight == 0.0 and cfg.guidance_scale == 12.0
    assert edit_config(case, "full", 200, 0.4, {"lr": 0.8}).lr == 0.8


def _run(case, name, overrides, colour_ok, drift):
    cfg = edit_config(case, name, 200, 0.4, overrides)
    return {"config": name, "case": case["id"], "kind": case["kind"], "steps": 200, "model_hash": "m",
            "edit_fingerprint": cfg.fingerprint(), "edit_config": cfg.to_dict(), "overrides": overrides, "seconds": 1.0,
            "metrics": {"colour_ok": colour_ok, "shape_ok": False, "drift_px": drift, "motion_fidelity": 0.5,
                        "flow_epe_px": 0.1, "frame_consistency": 0.9}}


def test_other_settings_pair_with_the_same_cases_at_the_defaults():
    suite = build_suite()
    a, b = suite[0], suite[1]
    defaults = [_run(a, "full", {}, False, 2.0), _run(b, "full", {}, True, 1.0)]
    swept = [_run(a, "full", {"guidance_scale": 15.0}, True, 1.0)]
    # a run of earlier defaults (S-SSM 500) and a --set run equal to today's default
    earlier = [_run(b, "full", {"s_ssm_weight": 500.0}, True, 3.0)]
    same = [_run(b, "full", {"t_ssm_weight": edit_config(b, "full", 200, 0.4).t_ssm_weight}, True, 1.0)]
    rows = sweep_summary(defaults + swept + earlier + same, defaults, suite, 200, 0.4, "m")
    by_label = {r["set"]: r for r in rows}
    assert set(by_label) == {"guidance_scale=15", "s_ssm_weight=500"}
    g = by_label["guidance_scale=15"]
    assert g["cases"] == [a["id"]] and g["swept"]["colour_success"] == 1.0 and g["defaults"]["colour_success"] == 0.0
    assert g["swept"]["mean_drift_px"] == 1.0 and g["defaults"]["mean_drift_px"] == 2.0
    assert by_label["s_ssm_weight=500"]["swept"]["mean_drift_px"] == 3.0
    assert set(summarize(defaults)) == {"full"} and set(CONFIGS) >= {"full", "vdds_only", "no_sssm", "no_tssm", "no_mask"}


def test_loss_balance_observes_the_pipelines_own_update(editor, clip):
    """benchmarks.loss_balance reads the split from the pipeline's step; asking for the split (a second
    backward) leaves the edit as it is without it, and the parts recompose the applied update."""
    from benchmarks.loss_balance import sensitivity, walk
    from fastdm import EditConfig

    case = build_suite()[0]
    cfg = EditConfig(case["source_prompt"], case["target_prompt"], steps=4, seed=0)
    rows = walk(editor, case, cfg, every=2)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["vdds_norm"] > 0 and r["s_norm_per_weight"] > 0 and r["t_norm_per_weight"] > 0

    recomposed = []

    def check(_p, _step, _t, tensors):
        parts = tensors["grad_parts"]
        want = parts["vdds"] + cfg.s_ssm_weight * parts["s_ssm"] + cfg.t_ssm_weight * parts["t_ssm"]
        recomposed.append(float((want - tensors["grad"]).norm() / tensors["grad"].norm()))

    split = editor(clip, config=cfg, callback_on_step_end=check, callback_on_step_end_tensor_inputs=("grad_parts", "grad"))
    plain = editor(clip, config=cfg)
    # measured: 0 to 3e-7 relative (one backward of the weighted sum vs two of the terms)
    assert max(recomposed) < 1e-5
    assert float((split.working - plain.working).norm() / (plain.working - editor.backbone.to_working(
        torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1)).norm()) < 1e-5
    sens = sensitivity(editor, timesteps=(500,))
    assert sens["losses"]["shifted 3 px"]["s_ssm"][0] > 0 and len(sens["losses"]) == 5


def test_cascaded_rows_render_the_same_case_at_twice_the_size_and_score_in_its_pixels():
    import numpy as np

    from benchmarks.suite import bicubic, render_case_at
    from fastdm.toyworld.metrics import centroid, object_mask, video_summary

    case = build_suite()[0]
    lo, hi = render_case(case), render_case_at(case, 2)
    assert hi.shape == (lo.shape[0], 64, 64, 3)
    # the same object, path and speed, doubled: 4x the area, centroids at twice the coordinates
    for a, b in zip(lo, hi):
        assert abs(object_mask(b).sum() / object_mask(a).sum() - 4.0) < 0.4
        (xa, ya), (xb, yb) = centroid(a), centroid(b)  # pixel-centre coordinates: they scale exactly
        assert abs(2 * xa - xb) < 0.5 and abs(2 * ya - yb) < 0.5
    assert video_summary(hi)["colours"] == [case["colour"]] * len(hi)
    up = bicubic(lo, (64, 64))
    assert up.shape == hi.shape and up.dtype == np.uint8
    assert video_summary(up)["colours"] == [case["colour"]] * len(up)


def test_the_full_suite_holds_every_colour_pair_and_two_halves_of_one_make_up():
    from collections import Counter

    from fastdm.toyworld.suite import build_full_suite, render_case, suite_half
    from fastdm.toyworld.world import COLOURS, SHAPES

    cases = build_full_suite()
    colour = [c for c in cases if c["kind"] == "colour"]
    assert len(colour) == 42 and {(c["colour"], c["target_colour"]) for c in colour} == \
        {(a, b) for a in COLOURS for b in COLOURS if a != b}
    shape = [c for c in cases if c["kind"] == "shape"]
    assert len(shape) == 12 and {(c["shape"], c["target_shape"]) for c in shape} == {(a, b) for a in SHAPES for b in SHAPES if a != b}
    assert len({c["id"] for c in cases}) == len(cases) and build_full_suite() == cases  # fixed: no random draw
    choose, report = suite_half(cases, "choose"), suite_half(cases, "report")
    assert len(choose) == len(report) == 27 and not {c["id"] for c in choose} & {c["id"] for c in report}

    def make_up(half):
        colour_edits = [c for c in half if c["kind"] == "colour"]
        return (Counter(c["kind"] for c in half), {frozenset((c["colour"], c["target_colour"])) for c in colour_edits},
                {frozenset((c["shape"], c["target_shape"])) for c in half if c["kind"] == "shape"},
                Counter(c["target_colour"] for c in colour_edits), Counter(c["colour"] for c in colour_edits),
                Counter(c["target_shape"] for c in half if c["kind"] == "shape"))

    # every unordered pair once in each half, one direction each; every colour 3 times a source and 3 times a target
    assert make_up(choose) == make_up(report)
    assert set(Counter(c["target_colour"] for c in choose if c["kind"] == "colour").values()) == {3}
    for key in ("direction", "shape", "radius", "speed"):  # the rotations cover every value
        assert len({c[key] for c in colour}) > 1
    assert render_case(cases[0]).shape == (8, 32, 32, 3)
    # a fresh variant (ARCHITECTURE.md rule 7): the same pairs in the same halves, every clip drawn anew
    fresh = build_full_suite(variant=1)
    assert [(c["kind"], c["half"], c["colour"] if c["kind"] == "colour" else c["shape"]) for c in fresh] == \
        [(c["kind"], c["half"], c["colour"] if c["kind"] == "colour" else c["shape"]) for c in cases]
    assert make_up(suite_half(fresh, "choose")) == make_up(suite_half(fresh, "report")) == make_up(report)
    for old, new in zip(cases, fresh):
        changed = [k for k in ("shape", "colour", "direction", "radius", "speed") if old[k] != new[k]]
        assert changed == (["shape", "direction", "radius", "speed"] if old["kind"] == "colour" else
                           ["colour", "direction", "radius", "speed"]), (old["id"], changed)
    with pytest.raises(ValueError, match="variant"):
        build_full_suite(variant=-1)
