"""What the quality, cascade, loss-balance and upscale benchmarks share: the suite's configurations
(the paper's ablations), each case's EditConfig and mask, the summary of a set of runs, and the
cases rendered at a larger scale for the cascade. The cases, clips and scores themselves live in the
installed package (:mod:`fastdm.toyworld.suite`), re-exported here, so tests import them without this folder.
"""

from __future__ import annotations

import math

import numpy as np

from fastdm.toyworld.suite import area_kept, background_change, box_mask, build_suite, render_case, score  # noqa: F401  (re-exported)

CONFIGS = {
    "full": dict(mask=True),
    "vdds_only": dict(mask=True, s_ssm_weight=0.0, t_ssm_weight=0.0),
    "no_sssm": dict(mask=True, s_ssm_weight=0.0),
    "no_tssm": dict(mask=True, t_ssm_weight=0.0),
    "no_mask": dict(mask=False),
    "auto_mask": dict(mask="auto"),
}
# the mask axis: the full method with no mask, the automatic mask and the box mask
MASK_AXIS = {"none": "no_mask", "auto": "auto_mask", "box": "full"}
# metrics a run must have to count (runs scored before a metric existed are run again when asked for)
SCORE_KEYS = ("colour_ok", "shape_ok", "drift_px", "motion_fidelity", "flow_epe_px", "frame_consistency", "area_kept",
              "background_change")


def parse_setting(item: str, *, lists: bool = False, reserved: tuple[str, ...] = ("steps",)) -> tuple[str, list]:
    """``"guidance_scale=15"`` -> ``("guidance_scale", [15.0])``, typed as the EditConfig setting's default;
    with ``lists``, ``"soft_mask=0,1"`` -> ``("soft_mask", [0.0, 1.0])``. ``reserved`` settings (a benchmark's own
    flag) are refused. A one-line FastDMError otherwise."""
    import dataclasses

    from fastdm import EditConfig
    from fastdm.errors import FastDMError

    fields = {f.name for f in dataclasses.fields(EditConfig)}
    key, sep, value = item.partition("=")
    if not sep or not value or key not in fields or key in ("source_prompt", "target_prompt", "tap_layers", *reserved):
        raise FastDMError(f"--set {item!r}: expected FIELD=VALUE{'[,VALUE...]' if lists else ''} with FIELD an EditConfig "
                          "setting such as guidance_scale, t_ssm_weight")
    kind = type(getattr(EditConfig("a", "b"), key))  # (its type: the same in every preset)
    if kind is type(None):  # (window, guidance_scale_2: no default value to type it by)
        raise FastDMError(f"--set {item!r}: {key} has no built-in value to read {value!r} as; give it another way "
                          "(fastdm-edit's own flag)")
    values = value.split(",") if lists else [value]
    try:
        return key, [kind(v) for v in values]
    except ValueError:
        raise FastDMError(f"--set {item!r}: {value!r} is not a {kind.__name__}") from None


def frames_of(backbone, x) -> np.ndarray:
    """The (F, H, W, 3) uint8 frames of a working tensor (an edit's ``run.x``)."""
    import torch

    from fastdm.io.tensors import tensor_to_frames

    with torch.no_grad():
        return tensor_to_frames(backbone.from_working(x.detach()))


def over_builtins(pipe, settings: dict) -> dict:
    """A benchmark candidate's settings with every setting the model folder's ``fastdm.json`` sets put back to
    EditConfig's built-in value first: a candidate is the built-in defaults plus its own settings, whatever the
    folder's measured defaults are (they would leak in otherwise: the UNet's ``stop=extend`` extended 12-step
    candidates; ARCHITECTURE.md rule 9d)."""
    from fastdm import EditConfig

    folder = (getattr(pipe.backbone, "settings", None) or {}).get("defaults", {})
    builtin = EditConfig("a", "b")
    return {**{k: getattr(builtin, k) for k in folder}, **settings}


def edit_config(case: dict, name: str, steps: int, lr: float, overrides: dict | None = None):
    """The EditConfig of one suite case under one configuration (its mask flag aside).

    ``overrides`` (from ``--set``) change EditConfig fields for a sweep; an ablation's own
    settings (a weight it turns off) win over them. The suite runs the paper's schedule (``--preset
    paper``: its ablations are the paper's Table 3); fastdm's default schedule is measured against it
    in ``benchmarks/cost.py``.
    """
    from fastdm.driver.config import config_from_preset

    opts = {"lr": lr, **(overrides or {}), **{k: v for k, v in CONFIGS[name].items() if k != "mask"}}
    return config_from_preset("paper", case["source_prompt"], case["target_prompt"], steps=steps, seed=0, **opts)


def case_mask(clip: np.ndarray, name: str):
    """The mask a configuration edits with: the box mask, ``"auto"`` or None."""
    kind = CONFIGS[name]["mask"]
    return box_mask(clip) if kind is True else (kind or None)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for name in CONFIGS:
        rs = [r for r in runs if r["config"] == name]
        if not rs:
            continue
        col = [r for r in rs if r["kind"] in ("colour", "both")]
        shp = [r for r in rs if r["kind"] in ("shape", "both")]
        drifts = [r["metrics"]["drift_px"] for r in rs]
        finite = [d for d in drifts if math.isfinite(d)]
        out[name] = {
            "edits": len(rs),
            "colour_success": sum(r["metrics"]["colour_ok"] for r in col) / len(col) if col else None,
            "shape_success": sum(r["metrics"]["shape_ok"] for r in shp) / len(shp) if shp else None,
            "mean_drift_px": float(np.mean(finite)) if finite else None,
            "object_lost": len(drifts) - len(finite),
            "motion_fidelity": float(np.mean([r["metrics"]["motion_fidelity"] for r in rs])),
            "flow_epe_px": float(np.mean([r["metrics"]["flow_epe_px"] for r in rs])),
            "frame_consistency": float(np.mean([r["metrics"]["frame_consistency"] for r in rs])),
            "seconds_per_edit": float(np.median([r["seconds"] for r in rs])),  # median: robust to a busy machine
        }
        scored = [r for r in rs if "area_kept" in r["metrics"]]
        if scored:
            out[name]["area_kept"] = sum(r["metrics"]["area_kept"] for r in scored) / len(scored)
            out[name]["background_change"] = float(np.mean([r["metrics"]["background_change"] for r in scored]))
            out[name]["scored_mask_metrics"] = len(scored)
    return out


def render_case_at(case: dict, scale: int) -> np.ndarray:
    from fastdm.toyworld.world import render_clip

    return render_clip(case["colour"], case["shape"], case["direction"], size=case["size"] * scale, frames=case["frames"],
                       radius=case["radius"] * scale, speed=case["speed"] * scale)


def bicubic(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(F, h, w, 3) uint8 -> (F, H, W, 3) uint8, bicubic (torch, clamped)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False)
    return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
